"""The loggers of a run (W&B through Lightning's ``WandbLogger``): where they write, what lenscope
hands them, closing them, and where a person finds the run afterwards. Training and evaluation both
use these; lenscope never reads a logger's own files back (``results.json`` is the record)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger


def logger_save_dirs(config) -> list[Path]:
    """Each ``--trainer.logger``'s ``save_dir`` (the trainer takes one logger or a list of them)."""
    loggers = config.trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [Path(lg.init_args.save_dir) for lg in loggers
            if lg and not isinstance(lg, bool) and lg.get("init_args") and lg.init_args.get("save_dir")]


def drop_unset_wandb_anonymous(trainer) -> None:
    """Lightning's WandbLogger (2.6) always hands ``anonymous=None`` to ``wandb.init``, and W&B 0.31
    warns that the setting is deprecated whenever it is passed at all: leave it out when unset."""
    for logger in trainer.loggers:
        init = getattr(logger, "_wandb_init", None) if isinstance(logger, WandbLogger) else None
        if isinstance(init, dict) and init.get("anonymous", "set") is None:
            del init["anonymous"]


def wandb_locations(trainer: L.Trainer) -> list[str]:
    """Where each W&B run of the trainer went: a folder to sync (offline) or its page."""
    lines = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            where = Path(run.dir).parent if getattr(run, "dir", None) else None
            if where is not None and getattr(run, "offline", False):
                lines.append(f"W&B run:         {where}  (offline; upload with `wandb sync {where}`)")
            elif getattr(run, "url", None):
                lines.append(f"W&B run:         {run.url}")
    return lines


def finish_loggers(cli: LightningCLI) -> None:
    """Close W&B runs now, when ``main`` returns, not at interpreter exit. What a run logged is
    also in the run's own results.json, which is the record lenscope reads back."""
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
