"""JSON that every parser reads: Python's ``json`` writes a non-finite float as a bare ``NaN`` or
``Infinity``, which is not JSON. lenscope writes a number that has no finite value (a mean over
nothing, a score of an empty set) as ``null``."""

from __future__ import annotations

import json
import math


def finite_or_null(value):
    """``value`` with every non-finite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value, indent: int | None = 2) -> str:
    """``value`` as strict JSON text (non-finite numbers as null), ending with a newline."""
    return json.dumps(finite_or_null(value), indent=indent, allow_nan=False) + "\n"
