"""Train lenses: ``python train.py fit --config configs/quickstart.yaml``.

A ``LightningCLI`` over ``LensTrainingModule`` (``--model.*``) and ``LensDataModule`` (``--data.*``);
``python train.py fit --help`` lists every option with its documentation. Known failures (bad data,
a model that cannot be loaded, a wrong setting) end with one line naming the problem and the fix,
and exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from cli_errors import run_with_clean_errors
from datamodules.lens_data import LensDataModule
from training.callbacks import StepProgressBar
from training.lens_module import LensTrainingModule
from training.wandb_summary import write_summary_file


class LensCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.enable_model_summary": False})

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # The training stream is endless, so Lightning's bar would show no total: use one that
        # counts steps out of max_steps, unless the progress bar is switched off.
        if config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def finish_loggers(cli: LightningCLI) -> None:
    """Close W&B runs now, so their summary is on disk when ``main`` returns (not at exit)."""
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            run = logger.experiment
            run_dir = Path(run.dir).parent
            run.finish()
            if list(run_dir.glob("run-*.wandb")):
                write_summary_file(run_dir)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def run() -> None:
        cli = LensCLI(LensTrainingModule, LensDataModule, args=argv, save_config_kwargs={"overwrite": True})
        finish_loggers(cli)

    run_with_clean_errors(run)


if __name__ == "__main__":
    main()
