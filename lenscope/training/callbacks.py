"""Callbacks: the lens artifact and results table at the end of training, and a step progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lenscope.files import atomic_write
from lenscope.lenses.artifact import save_lens
from lenscope.lenses.lens import residual_name
from lenscope.lenses.metrics import per_layer_table
from lenscope.loggers import wandb_locations
from lenscope.training.checkpoint_io import read_checkpoint


def results_table(results: dict, unit: str = "bits") -> str:
    """Markdown table: per layer, KL(final ‖ lens) for every scored lens (the logit lens and the
    trained lens, per offset: ``tuned+2`` targets the model's distribution 2 tokens ahead), then
    the cross-entropy against the real token, all per token in ``unit``."""
    return per_layer_table(results["layers"], {f"{lens} {metric.upper()} ({unit})": results[lens][f"{metric}_{unit}"]
                                               for metric in ("kl", "ce") for lens in results["lenses"]})


def training_data(trainer: L.Trainer) -> dict | None:
    """What the lenses were trained on, as the data module was configured (for the artifact and its model card)."""
    hparams = getattr(getattr(trainer, "datamodule", None), "hparams", None)
    if not hparams:
        return None
    keys = ("source", "split", "text_field", "mode", "seq_len", "batch_size", "holdout_every", "seed")
    return {key: hparams[key] for key in keys if key in hparams}


def held_out(results: dict | None, key: str) -> dict | None:
    """The lens ``key``'s last held-out scores per layer (bits per token), or None before any."""
    if not results or key not in results:
        return None
    return {"step": results.get("step"), "kl_bits": results[key]["kl_bits"], "ce_bits": results[key]["ce_bits"]}


class LensArtifactWriter(L.Callback):
    """At the end of ``fit``: one lens artifact per trained lens, ``results.json`` and ``results.md``."""

    DEFAULT_DIRPATH = "artifacts/quickstart"

    def __init__(self, dirpath: str = DEFAULT_DIRPATH):
        """
        Args:
            dirpath: output folder; each lens goes to ``<dirpath>/<name>`` (``tuned``, ``tuned+1``,
                ... for offsets 0, 1, ...), the per-layer results next to them.
        """
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        tokens_seen = pl_module.total_tokens_seen()  # a collective: every rank takes part
        if not trainer.is_global_zero:
            return
        self._written = self.write_lenses(trainer, pl_module, trainer.global_step, tokens_seen,
                                          str(pl_module.lens_compute_dtype).removeprefix("torch."))
        self._write_results(trainer, pl_module)

    def write_lenses(self, trainer: L.Trainer, pl_module, step: int, tokens_seen: int, lens_dtype: str) -> list[Path]:
        """One artifact per lens of ``pl_module``, as trained for ``step`` steps on ``tokens_seen`` positions."""
        return [save_lens(
            lens, self.dirpath / key, base_model=pl_module.hparams.base["name"],
            revision=pl_module.frozen.revision, unembed_hash=pl_module.frozen.unembed_hash,
            num_hidden_layers=pl_module.frozen.num_layers,
            extra={"trained_steps": step, "tokens_seen": tokens_seen,
                   "warm_start_batches": pl_module.warm_start_batches,
                   "training_data": training_data(trainer),
                   "held_out": held_out(pl_module.last_results, key),
                   "lenscope_lens_dtype": lens_dtype},
        ) for key, lens in pl_module.lenses.items()]

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        # After on_train_end, where the progress bar closes: the last lines of the run are these.
        if getattr(self, "_written", None):
            print(where_files_went(trainer, self._written, self.dirpath))

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        # ``train.py validate`` has no train end: write its results here.
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write_results(trainer, pl_module)

    def _write_results(self, trainer: L.Trainer, pl_module) -> None:
        results = pl_module.last_results
        if results is None:
            return
        cache = pl_module.cache
        results = {**results, "cache": {"hit_rate": cache.hit_rate, "bytes_per_token": cache.bytes_per_token}
                   if cache else None, "units": "per token; nats and bits (1 bit = ln 2 nats)"}
        atomic_write(self.dirpath / "results.json", json.dumps(results, indent=2) + "\n")
        table = results_table(results)
        atomic_write(self.dirpath / "results.md", table + "\n")
        # Through the progress bar (when there is one) so that the table is not torn by its redraws.
        say = trainer.progress_bar_callback.print if trainer.progress_bar_callback else print
        say(f"\nHeld-out per-layer results (step {results['step']}), also in {self.dirpath / 'results.md'}:\n{table}\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                lenses = results["lenses"]
                columns = ["residual", "layer"] + [f"{lens}_{m}_bits" for m in ("kl", "ce") for lens in lenses]
                data = [[layer, residual_name(layer)] + [results[lens][f"{m}_bits"][i] for m in ("kl", "ce") for lens in lenses]
                        for i, layer in enumerate(results["layers"])]
                logger.log_table("val/per_layer", columns=columns, data=data)


def where_files_went(trainer: L.Trainer, lenses: list[Path], results: Path) -> str:
    """The end of a training run's output: every file a person may want next, and what to do with it."""
    lines = [f"Lens artifacts:  {', '.join(str(p) for p in lenses)}  (load with lenscope.load_lens(path, model))"]
    if (results / "results.md").exists():
        lines.append(f"Results:         {results / 'results.md'}, {results / 'results.json'}")
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            lines.append(f"Checkpoint:      {callback.last_model_path}  (continue with --ckpt_path last)")
    lines += wandb_locations(trainer)
    return "\n".join(lines)


class StepProgressBar(TQDMProgressBar):
    """The training stream is endless (training stops on ``max_steps``), so show steps out of max_steps."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps and trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description("Training")


def write_lenses_from_checkpoint(trainer: L.Trainer, pl_module, datamodule, path: Path,
                                 writers: list[LensArtifactWriter]) -> None:
    """Finish a run that was cut short after its final checkpoint and before its lens artifacts
    (a kill, an out-of-memory, a full disk): score the checkpoint's lenses as the run's last
    validation did (``validate`` restores them and writes the results) and write their artifacts,
    with the step and tokens the checkpoint records. Nothing is trained."""
    checkpoint = read_checkpoint(path)
    step = checkpoint["global_step"]
    saved = checkpoint.get("lenscope", {})
    tokens_seen = sum(saved.get("tokens_seen_by_rank") or [0])
    rank_zero_info(f"{path} holds the final lens (step {step}) of a run that stopped before writing its lens "
                   "artifacts: writing them from it, and its held-out results, instead of training")
    trainer.validate(pl_module, datamodule=datamodule, ckpt_path=path, verbose=False)
    pl_module.solve_closed_form_fits()  # what validation does first; without validation, still needed
    if not trainer.is_global_zero:
        return
    lens_dtype = saved.get("lens_compute_dtype") or str(pl_module.lens_compute_dtype).removeprefix("torch.")
    for writer in writers:
        written = writer.write_lenses(trainer, pl_module, step, tokens_seen, lens_dtype)
        print(where_files_went(trainer, written, writer.dirpath))
