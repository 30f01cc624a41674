"""The project's user-facing error types.

Every error that means "the input or a setting is wrong" derives from ``UserError``; the command
line prints such errors as one line naming the problem and the fix (exit status 2). Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import math


class UserError(Exception):
    """Bad input or a bad setting; the message names the problem and the fix in one line."""


class ConfigError(UserError, ValueError):
    """A setting is invalid; the message names the flag to change."""


def one_line(err: BaseException, with_type: bool = False) -> str:
    """The first line of an error's message (with its type's name if ``with_type``: for a library's
    error quoted inside ours), also when it was re-raised from a dataloader worker, whose message
    embeds the worker's traceback and ends with the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        name, _, rest = text.partition(": ")
        text = rest if name.replace(".", "").isidentifier() else text
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0]}" if with_type else text.splitlines()[0]


def check_finite(flag: str, value: float, low: float = 0.0, below: float | None = None, low_open: bool = False) -> None:
    """``value`` is a finite number ≥ ``low`` (> ``low`` when ``low_open``) and < ``below``."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if low_open else value >= low)
    if ok and below is not None:
        ok = value < below
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if below is not None:
            bound += f" and < {below:g}"
        raise ConfigError(f"{flag} must be a finite number {bound}, got {value}")
