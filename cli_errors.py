"""One-line errors for the command-line entry points (see ``lenses.errors``)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from lenses.errors import UserError


def one_line(err: BaseException) -> str:
    """The user-facing line of an error, also when it was re-raised from a dataloader worker
    (whose message embeds the worker's traceback and ends with the original message)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        name, _, rest = text.partition(": ")
        text = rest if name.replace(".", "").isidentifier() else text
    return text.splitlines()[0] if text else type(err).__name__


def is_user_error(err: BaseException) -> bool:
    """UserErrors, also when a dataloader worker re-raised one under a generic type."""
    return isinstance(err, (UserError, OSError)) or (
        "Original Traceback" in str(err) and "Error: " in str(err).strip().splitlines()[-1]
        and any(cls.__name__ in str(err).strip().splitlines()[-1] for cls in _user_error_types())
    )


def _user_error_types() -> list[type]:
    seen, todo = [], [UserError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def run_with_clean_errors(fn: Callable[[], object]) -> object:
    """Run ``fn``; print a known error as ``error: <one line>`` and exit with status 2."""
    try:
        return fn()
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
