"""Score lenses as patchscope mappings on the Patchscopes next-token protocol.

    python evaluate.py --config configs/eval/patchscopes.yaml --lenses artifacts/future/tuned artifacts/future/tuned+1

A ``LightningCLI`` over ``PatchscopeEvaluation`` (``--model.*``: the methods) and
``PatchscopeDataModule`` (``--data.*``: the protocol), run with ``trainer.test`` so that it has a
progress bar, W&B logging and multi-GPU for free. ``python evaluate.py --help`` lists every option.
Results go to ``--model.output_dir``: results.json, results.csv, results.md (tables) and one PNG
per metric.
"""

from __future__ import annotations

import os
from pathlib import Path

from lenscope.allocator import keep_freed_memory
from lenscope.cli.errors import (
    LenscopeCLI,
    run_with_clean_errors,
)
from lenscope.datamodules.patchscope_data import PatchscopeDataModule
from lenscope.evaluation.patchscope_module import PatchscopeEvaluation
from lenscope.loggers import finish_loggers, logger_save_dirs
from lenscope.training.preflight import check_not_replacing, claim_outputs


class EvaluateCLI(LenscopeCLI):
    def before_instantiate_classes(self) -> None:
        # Before the model is loaded: the results folder must be writable, not hold an earlier
        # evaluation's results (unless --overwrite), and not be in use by another run.
        results = {Path(self.config.model.output_dir): "--model.output_dir"}
        claim_outputs({}, results, logger_save_dirs(self.config))
        check_not_replacing(results, self.config.get("overwrite", False), resume_hint=False)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--lenses", type=str, nargs="+", default=[],
                            help="lens artifact folders written by `lenscope train` (tuned, future, affine and learned-prompt lenses)")
        parser.link_arguments("lenses", "model.lenses")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace the results of an earlier evaluation in --model.output_dir "
                                 "(without it, the run refuses to write over them)")
        # Every document is given to exactly one rank by the data module itself.
        parser.set_defaults({"trainer.enable_model_summary": False, "trainer.use_distributed_sampler": False})


def main(argv: list[str] | None = None, prog: str = "python evaluate.py") -> None:
    """``prog``: how the user started it (named in the hint of an error)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def run() -> None:
        cli = EvaluateCLI(PatchscopeEvaluation, PatchscopeDataModule, run=False, args=argv, prog=prog,
                          save_config_callback=None, auto_configure_optimizers=False)
        keep_freed_memory(cli.trainer.strategy.root_device.type)  # a command on the CPU only
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
        finish_loggers(cli)

    run_with_clean_errors(run, where="during the evaluation; its results are missing or incomplete")

