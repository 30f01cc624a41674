"""Train lenses: ``python train.py fit --config configs/quickstart.yaml``.

A ``LightningCLI`` over ``LensTrainingModule`` (``--model.*``) and ``LensDataModule`` (``--data.*``);
``python train.py fit --help`` lists every option with its documentation. Known failures (bad data,
a model that cannot be loaded, a wrong setting) end with one line naming the problem and the fix,
and exit status 2; a stop by SIGTERM or Ctrl-C ends with a checkpoint and one line (see
``lenscope/training/stops.py``).

Before the model is loaded, the run checks where it will write (``lenscope/training/preflight.py``): the
folders must be writable, must not hold an earlier run's results (unless ``--overwrite true`` or
``--ckpt_path`` continues that run) and must not be in use by another run; a checkpoint to resume
from must be one that can be resumed exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from lenscope.cli.errors import (
    LenscopeCLI,
    plain,
    run_with_clean_errors,
)
from lenscope.datamodules.lens_data import LensDataModule
from lenscope.errors import ConfigError
from lenscope.loggers import finish_loggers, logger_save_dirs
from lenscope.training.callbacks import (
    LensArtifactWriter,
    StepProgressBar,
    write_lenses_from_checkpoint,
)
from lenscope.training.checkpoint_io import AtomicCheckpointIO
from lenscope.training.lens_module import LensTrainingModule
from lenscope.training.preflight import (
    check_not_replacing,
    check_resume,
    check_schedule,
    claim_outputs,
    is_first_process,
    last_checkpoint,
    load_checkpoint,
    remove_leftover_temporaries,
)
from lenscope.training.stops import GracefulStop


class LensCLI(LenscopeCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.enable_model_summary": False})
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace an earlier run's lens artifacts, results and checkpoints in the output "
                                 "folders (without it, a run refuses to write over them)")

    def _parse_ckpt_path(self) -> None:
        """Lightning's version loads the checkpoint's hyperparameters over the command line's, so a
        changed setting would be dropped silently; lenscope compares them instead (before_instantiate_classes)."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        if self.subcommand == "fit":
            check_schedule(plain(trainer))
        for args in _callbacks(config, "ModelCheckpoint"):
            # Lightning writes last-v1.ckpt beside a last.ckpt it did not write in this process (a
            # copied run folder), leaving last.ckpt, which --ckpt_path last resumes from, stale. A run
            # never writes over an earlier run's checkpoints unless resuming it or told to
            # (check_not_replacing), so the checkpoint names need no version.
            args.enable_version_counter = False
        root = Path(trainer.get("default_root_dir") or os.getcwd())
        results = result_folders(config)
        claim_outputs({root: "--trainer.default_root_dir"}, results, logger_save_dirs(config))
        path = resolve_ckpt_path(config)
        if is_first_process():
            remove_leftover_temporaries(results)  # the folders are locked: their writers are dead
        checkpoint = load_checkpoint(path) if path is not None else None
        if path is not None:
            # Lightning resolves ``last`` to the newest last*.ckpt of the folder, which may be another
            # file than the one read and checked here: it is handed the same file.
            config.ckpt_path = str(path)
        self.final_checkpoint: Path | None = None
        if self.subcommand != "fit" and checkpoint is None:
            raise ConfigError(f"{self.prog} {self.subcommand} scores a trained lens: pass --ckpt_path (a checkpoint "
                              "file, or last); without one it would score untrained lenses and replace the run's results")
        if checkpoint is not None:
            training = self.subcommand == "fit"
            if check_resume(path, checkpoint, plain(config.model), plain(config.data) if training else None,
                            plain(trainer) if training else None, artifact_folders(config)):
                self.final_checkpoint = path
            # Resuming continues the same W&B run: the run id travels in the checkpoint.
            run_id = checkpoint["lenscope"].get("wandb_run_id")
            loggers = trainer.get("logger")
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                if run_id and logger and not isinstance(logger, bool) and "WandbLogger" in str(logger.get("class_path", "")):
                    logger.init_args.id = run_id
                    logger.init_args.resume = "allow"
        elif self.subcommand == "fit":
            check_not_replacing(results, config.get("overwrite", False), resume_hint=True)

    def fit(self, model, datamodule, **kwargs) -> None:
        """``trainer.fit``, unless the checkpoint is the final lens of a run cut short before its
        artifacts were written (check_resume): then they are written from it, and nothing is trained."""
        if self.final_checkpoint is None:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
            return
        writers = [c for c in self.trainer.callbacks if isinstance(c, LensArtifactWriter)]
        write_lenses_from_checkpoint(self.trainer, model, datamodule, self.final_checkpoint, writers)

    def before_fit(self) -> None:
        self.model.check_trainer(self.trainer)  # here, before Lightning starts the other ranks

    def before_validate(self) -> None:
        self.model.check_trainer(self.trainer)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # The training stream is endless, so Lightning's bar would show no total: use one that
        # counts steps out of max_steps, unless the progress bar is switched off.
        if config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, StepProgressBar()]
        callbacks = [*callbacks, GracefulStop()]  # SIGTERM / Ctrl-C: checkpoint at the step end, then stop
        # Checkpoints are written atomically (lenscope/training/checkpoint_io.py), beside any other plugin given.
        plugins = list(config.get("plugins") or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config = {**config, "plugins": [*plugins, AtomicCheckpointIO()]}
        return super()._instantiate_trainer(config, callbacks)


def _callbacks(config, name: str) -> list:
    """init_args of the configured callbacks whose class is ``name``."""
    return [c.init_args for c in config.trainer.get("callbacks") or []
            if str(c.get("class_path", "")).rsplit(".", 1)[-1] == name]


def result_folders(config) -> dict[Path, str]:
    """Folders that hold a run's results: lens artifacts and results tables, checkpoints."""
    folders = {Path(args.get("dirpath") or LensArtifactWriter.DEFAULT_DIRPATH): "the LensArtifactWriter's dirpath"
               for args in _callbacks(config, "LensArtifactWriter")}
    folders.update({Path(args.dirpath): "the ModelCheckpoint's dirpath"
                    for args in _callbacks(config, "ModelCheckpoint") if args.get("dirpath")})
    return folders


def artifact_folders(config) -> list[Path]:
    """Where the run writes its lens artifacts (the LensArtifactWriters' folders)."""
    return [Path(args.get("dirpath") or LensArtifactWriter.DEFAULT_DIRPATH) for args in _callbacks(config, "LensArtifactWriter")]


def resolve_ckpt_path(config) -> Path | None:
    """The checkpoint this run starts from: ``--ckpt_path`` (``last``: the configured ModelCheckpoint's
    ``last.ckpt``, or one line saying there is none), or, in a job SLURM requeued (or with
    ``--ckpt_path hpc``), Lightning's requeue checkpoint. The preflight reads it (never running code)
    before Lightning does."""
    ckpt = config.get("ckpt_path")
    if ckpt == "best":
        return None  # Lightning's keyword: the best checkpoint of this same process's run
    if ckpt and ckpt not in ("last", "hpc"):
        return Path(ckpt)
    if ckpt == "last":
        return last_checkpoint([Path(args.dirpath) for args in _callbacks(config, "ModelCheckpoint") if args.get("dirpath")])
    root = Path(config.trainer.get("default_root_dir") or os.getcwd())
    numbered = [(int(p.stem.rsplit("_", 1)[-1]), p) for p in root.glob("hpc_ckpt_*.ckpt")
                if p.stem.rsplit("_", 1)[-1].isdigit()]
    if numbered and (ckpt == "hpc" or SLURMEnvironment.detect()):
        return max(numbered)[1]  # what Lightning resumes from by itself: the highest number
    return None


def main(argv: list[str] | None = None, prog: str = "python train.py") -> None:
    """``prog``: how the user started it (named in the hint of an error)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def run() -> None:
        cli = LensCLI(LensTrainingModule, LensDataModule, args=argv, prog=prog, save_config_kwargs={"overwrite": True})
        finish_loggers(cli)

    run_with_clean_errors(run)

