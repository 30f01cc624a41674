"""Train lenses: ``python train.py fit --config configs/quickstart.yaml``.

A ``LightningCLI`` over ``LensTrainingModule`` (``--model.*``) and ``LensDataModule`` (``--data.*``);
``python train.py fit --help`` lists every option with its documentation. Known failures (bad data,
a model that cannot be loaded, a wrong setting) end with one line naming the problem and the fix,
and exit status 2.
"""

from __future__ import annotations

import os
from lightning.pytorch.cli import LightningCLI

from cli_errors import run_with_clean_errors
from datamodules.lens_data import LensDataModule
from training.lens_module import LensTrainingModule


class LensCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.enable_model_summary": False})


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_with_clean_errors(lambda: LensCLI(
        LensTrainingModule, LensDataModule, args=argv, save_config_kwargs={"overwrite": True}
    ))


if __name__ == "__main__":
    main()
