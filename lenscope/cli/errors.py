"""What the two command lines (``train.py``, ``evaluate.py``) share: one-line errors (see
``lenscope.errors``) and a LightningCLI whose parse errors are one line too."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lenscope.errors import ConfigError, UserError, one_line
from lenscope.loggers import drop_unset_wandb_anonymous
from lenscope.training.preflight import release_locks
from lenscope.training.stops import StoppedBySignal, install_handlers


def is_user_error(err: BaseException) -> bool:
    """UserErrors, also when a dataloader worker re-raised one under a generic type."""
    return isinstance(err, (UserError, OSError)) or is_wandb_error(err) or (
        "Original Traceback" in str(err) and "Error: " in str(err).strip().splitlines()[-1]
        and any(cls.__name__ in str(err).strip().splitlines()[-1] for cls in _user_error_types())
    )


def is_wandb_error(err: BaseException) -> bool:
    """W&B's own errors (no login for an online run, say): settings, not bugs."""
    import wandb.errors

    return isinstance(err, wandb.errors.Error)


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
    install_handlers(where)
    quiet_expected_noise()
    try:
        return fn()
    except StoppedBySignal as stop:
        print(f"error: {stop}", file=sys.stderr)
        status = stop.exit_status
    except SIGTERMException:  # Lightning's own SIGTERM handling, where lenscope's was not in place
        print(f"error: stopped by SIGTERM {where}", file=sys.stderr)
        status = 128 + signal.SIGTERM
    except Exception as err:
        if is_trainer_setting_error(err):
            print(f"error: invalid --trainer setting: {one_line(err)}", file=sys.stderr)
        elif not is_user_error(err):
            raise
        elif is_wandb_error(err):
            print(f"error: W&B: {one_line(err)} (or log offline: --trainer.logger.offline true)", file=sys.stderr)
        else:
            print(f"error: {one_line(err)}", file=sys.stderr)
        status = 2
    finally:
        release_locks()
    raise SystemExit(status)


# Warnings lenscope triggers on purpose, each matched by its message and the module raising it, so
# that any other warning (from the same modules too) still shows:
EXPECTED_WARNINGS = [
    # The training step pulls its own batch (exact resume: the saved data position is the last batch
    # trained, not one prefetched ahead). Lightning calls that signature experimental, twice.
    (r"You are using the `dataloader_iter` step flavor", r"lightning\.pytorch\.trainer\.configuration_validator"),
    (r"Found `dataloader_iter` argument in the `training_step`", r"lightning\.pytorch\.loops\.utilities"),
    # The frozen model stays in eval mode while the lenses train (no dropout in the teacher).
    (r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\.pytorch\.loops\.fit_loop"),
    # `lenscope train …` hands LightningCLI its arguments while sys.argv keeps them as typed (a DDP
    # launcher re-runs sys.argv, which must stay `lenscope train …`).
    (r"LightningCLI's args parameter is intended to run from within Python", r"lightning\.pytorch\.cli"),
    # Deprecations inside dependencies, raised by their own code, nothing lenscope calls.
    (r"'set_vital' is deprecated", r"torchdata\.stateful_dataloader\.stateful_dataloader"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
]


class _DropTips(logging.Filter):
    """Lightning's advertisements for its cloud services ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_expected_noise() -> None:
    """Filter what lenscope triggers on purpose (above), at the places it is raised; W&B's own chatter
    goes too (WANDB_QUIET, set unless the user set it): lenscope says where the run went itself."""
    for message, module in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    os.environ.setdefault("WANDB_QUIET", "true")


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def plain(namespace) -> dict:
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace or {})


class LenscopeCLI(LightningCLI):
    """What ``train.py`` and ``evaluate.py`` share: parse errors as one line, not an 86-line usage."""

    def __init__(self, *args, prog: str, **kwargs):
        """``prog``: the command as the user typed it (``python train.py``, ``lenscope train``), for
        the ``--help`` hint of a parse error."""
        self.prog = prog
        quiet = {"exit_on_error": False}
        super().__init__(*args, parser_kwargs={**quiet, "prog": prog, **{sub: dict(quiet) for sub in SUBCOMMANDS}},
                         **kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        trainer = super()._instantiate_trainer(config, callbacks)
        drop_unset_wandb_anonymous(trainer)
        return trainer

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            words = list(sys.argv[1:] if args is None else args)
            command = " ".join([self.prog, *[w for w in words[:1] if w in SUBCOMMANDS]])
            raise ConfigError(f"{parse_error_line(err)} (see `{command} --help`)") from None


def parse_error_line(err: BaseException) -> str:
    """A jsonargparse parse error as one line naming the flag: its message spans several lines,
    the first only ``Parser key "noise":``."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    message = re.sub(r'Parser key "([^"]+)":', r"--\1:", message)
    return re.sub(r"<class '([\w.]+)'>", r"\1", message)


