"""One-line errors for the command-line entry points (see ``lenses.errors``)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

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


def is_trainer_setting_error(err: BaseException) -> bool:
    """Lightning's ``MisconfigurationException`` or ``ValueError`` raised while the ``Trainer`` is
    built, i.e. a bad ``--trainer.*`` value (e.g. ``--trainer.max_steps -5``). Raised anywhere else it may be a bug and
    keeps its traceback."""
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover - Lightning is a dependency
        return False
    # Lightning raises ValueError too for some settings (e.g. FSDP with --trainer.accelerator cpu).
    if not isinstance(err, (MisconfigurationException, ValueError)):
        return False
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "__init__" and Path(code.co_filename).as_posix().endswith("lightning/pytorch/trainer/trainer.py"):
            return True
        tb = tb.tb_next
    return False


def _user_error_types() -> list[type]:
    seen, todo = [], [UserError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def run_with_clean_errors(fn: Callable[[], object], where: str = "before training started; nothing was trained") -> object:
    """Run ``fn``; print a known error as ``error: <one line>`` and exit with status 2; a stop by a
    signal as ``error: stopped by SIGTERM <where>`` with status 128 + the signal's number.

    ``where`` says what a stop outside training leaves behind (training says it itself, with the step)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from training.stops import StoppedBySignal, install_handlers

    install_handlers(where)
    try:
        return fn()
    except StoppedBySignal as stop:
        print(f"error: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    except SIGTERMException:  # Lightning's own SIGTERM handling, where lenscope's was not in place
        print(f"error: stopped by SIGTERM {where}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as err:
        if is_trainer_setting_error(err):
            print(f"error: invalid --trainer setting: {one_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        if not is_user_error(err):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
