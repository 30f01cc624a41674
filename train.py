"""Train lenses: ``python train.py fit --config configs/quickstart.yaml``.

A ``LightningCLI`` over ``LensTrainingModule`` (``--model.*``) and ``LensDataModule`` (``--data.*``);
``python train.py fit --help`` lists every option with its documentation. Known failures (bad data,
a model that cannot be loaded, a wrong setting) end with one line naming the problem and the fix,
and exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from cli_errors import run_with_clean_errors
from datamodules.lens_data import LensDataModule
from training.callbacks import StepProgressBar
from training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from training.lens_module import LensTrainingModule
from training.stops import GracefulStop


class LensCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.enable_model_summary": False})

    def before_instantiate_classes(self) -> None:
        # Resuming continues the same W&B run: the run id travels in the checkpoint.
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_id = wandb_run_id_of(resolve_ckpt_path(config))
        logger = config.trainer.get("logger")
        if run_id and logger and "WandbLogger" in str(logger.get("class_path", "")):
            logger.init_args.id = run_id
            logger.init_args.resume = "allow"

    def before_fit(self) -> None:
        self.model.check_strategy(self.trainer.strategy)  # here, before Lightning starts the other ranks

    def before_validate(self) -> None:
        self.model.check_strategy(self.trainer.strategy)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # The training stream is endless, so Lightning's bar would show no total: use one that
        # counts steps out of max_steps, unless the progress bar is switched off.
        if config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, StepProgressBar()]
        callbacks = [*callbacks, GracefulStop()]  # SIGTERM / Ctrl-C: checkpoint at the step end, then stop
        # Checkpoints are written atomically (see training/checkpoint_io.py).
        if not config.get("plugins"):
            config = {**config, "plugins": [AtomicCheckpointIO()]}
        return super()._instantiate_trainer(config, callbacks)


def resolve_ckpt_path(config) -> Path | None:
    """The checkpoint file ``--ckpt_path`` names (``last``: ``last.ckpt`` of the configured ModelCheckpoint)."""
    ckpt = config.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt != "last":
        return Path(ckpt)
    for callback in config.trainer.get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and callback.init_args.get("dirpath"):
            return Path(callback.init_args.dirpath) / "last.ckpt"
    return None


def wandb_run_id_of(path: Path | None) -> str | None:
    """The W&B run id stored in a checkpoint; a checkpoint that does not load is refused here,
    with one line, rather than deep inside Lightning."""
    if path is None or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointWriteError(
            f"checkpoint {path} does not load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'damaged'}); "
            "it was cut short or modified: pass an earlier --ckpt_path or delete it to start over"
        ) from None
    return checkpoint.get("lenscope", {}).get("wandb_run_id")


def finish_loggers(cli: LightningCLI) -> None:
    """Close W&B runs now, when ``main`` returns, not at interpreter exit. What a run logged is
    also in the run's own results.json, which is the record lenscope reads back."""
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def run() -> None:
        cli = LensCLI(LensTrainingModule, LensDataModule, args=argv, save_config_kwargs={"overwrite": True})
        finish_loggers(cli)

    run_with_clean_errors(run)


if __name__ == "__main__":
    main()
