"""Checks a run makes before any work: that it can write where it will write, that it will not
silently replace another run's results, that no other run is writing there now, and that a
checkpoint it resumes from can be resumed exactly.

``train.py`` and ``evaluate.py`` call these on the parsed command line, before the model is loaded,
so a mistake costs a second, not a training run. Each failure is a ``UserError``: one line naming
the problem and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_only

from lenscope.errors import ConfigError, UserError
from lenscope.training.checkpoint_io import read_checkpoint
from lenscope.training.recipes import RECIPES, lr_factor

LOCK_NAME = ".lenscope.lock"


class OutputError(UserError):
    """An output folder cannot be written, already holds results, or is in use by another run."""


class ResumeError(UserError):
    """A checkpoint cannot be resumed (or validated) as asked."""


# --- output folders ----------------------------------------------------------------------------------
def check_writable(folder: Path, flag: str) -> None:
    """``folder`` (which may not exist yet) can be created and written: not a file, not under a
    file, not read-only. Probed by writing, since permissions alone say nothing for root."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise OutputError(f"output folder {folder} {where}; pass another folder as {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lenscope-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "read-only" if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else err.strerror
        raise OutputError(f"cannot write output folder {folder} ({existing} is {reason}); "
                          f"pass a writable folder as {flag}") from None


def is_first_process() -> bool:
    """Rank 0 of the whole job (the others are started later, by it or by the launcher)."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def claim_outputs(writes: dict[Path, str], results: dict[Path, str], logger_dirs: list[Path]) -> None:
    """Before any work: every folder the run writes into (``writes``, ``results``, the loggers')
    can be written; the results folders are locked for this run (by its first process). Taken
    before anyone looks for earlier results there: of two runs started at once, the second stops
    here, instead of both finding the folders empty and one overwriting the other."""
    for folder, flag in {**writes, **{d: "--trainer.logger.save_dir" for d in logger_dirs}, **results}.items():
        check_writable(folder, flag)
    for folder in logger_dirs:
        # W&B looks for a git repository from its folder at start-up, and warns if it does not exist yet.
        folder.mkdir(parents=True, exist_ok=True)
    if is_first_process():
        lock_folders(results)


def previous_results(folder: Path) -> list[str]:
    """What a finished or running lenscope run left in ``folder``: lens artifacts, results, checkpoints."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p.name + "/" for p in sorted(folder.iterdir()) if (p / "config.json").is_file() and (p / "lens.safetensors").exists()]
    found += [p.name for p in sorted(folder.glob("results.*"))]
    found += [p.name for p in sorted(folder.glob("*.ckpt"))]
    return found


def check_not_replacing(folders: dict[Path, str], overwrite: bool, resume_hint: bool) -> None:
    """Refuse to write into folders that hold an earlier run's results, unless ``overwrite``."""
    if overwrite:
        return
    for folder, flag in folders.items():
        found = previous_results(folder)
        if found:
            shown = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
            resume = "--ckpt_path last to continue that run, " if resume_hint else ""
            raise OutputError(f"{folder} already holds an earlier run's results ({shown}); pass {resume}"
                              f"--overwrite true to replace them, or another folder as {flag}")


_held_locks: list = []


def lock_folders(folders: dict[Path, str]) -> None:
    """Take an exclusive lock on each output folder until ``release_locks`` (the entry points call
    it when the run ends) or the process ends. ``flock``: the kernel releases it when the process
    ends, however it ends, so a crash never leaves a stale lock behind."""
    for folder, flag in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 (kept open: the lock lives as long as the file)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputError(f"another run ({holder}) is writing to {folder}; wait for it to finish, "
                              f"or pass another folder as {flag}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        _held_locks.append(handle)


def release_locks() -> None:
    while _held_locks:
        with contextlib.suppress(OSError):
            _held_locks.pop().close()


# --- resuming ----------------------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict:
    """The training checkpoint at ``path``, or one line saying why it is not one."""
    if not path.exists():
        raise ResumeError(f"checkpoint {path} does not exist; pass an existing .ckpt file or --ckpt_path last")
    if path.is_dir():
        hint = (" (it is a lens artifact: to start from a lens, pass it as --model.init_lens)"
                if (path / "lens.safetensors").exists() else "")
        raise ResumeError(f"--ckpt_path {path} is a folder, not a checkpoint file{hint}; pass a .ckpt file")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        raise ResumeError(f"--ckpt_path {path} is a safetensors weights file, not a training checkpoint; pass a .ckpt "
                          "from the run's checkpoint folder (to start from a lens artifact, use --model.init_lens)")
    checkpoint = read_checkpoint(path)  # never runs code: a checkpoint may come from someone else
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "lenscope" not in checkpoint:
        raise ResumeError(f"{path} is not a lenscope training checkpoint; pass a .ckpt written by `lenscope train`")
    return checkpoint


LAST = "last.ckpt"


def leftover_temporaries(folder: Path) -> list[Path]:
    """Files a writer killed mid-write left in ``folder``: ``lenscope.files.atomic_path`` writes
    ``.<name>.<random>.tmp`` beside its target and renames it into place only when complete."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(".*.tmp") if p.is_file()) if folder.is_dir() else []


def remove_leftover_temporaries(folders) -> None:
    """Remove what killed writers left in ``folders``. Only for folders this run has locked
    (``lock_folders``): no other lenscope run is writing there, so every temporary file is a dead one."""
    for folder in folders:
        for leftover in leftover_temporaries(folder):
            leftover.unlink(missing_ok=True)


def last_checkpoint(folders: list[Path]) -> Path:
    """``--ckpt_path last``: the ``last.ckpt`` of the run's checkpoint folders, or one line saying
    where it looked, what it found there and how to start afresh (never a silent start from step 0)."""
    for folder in folders:
        if (Path(folder) / LAST).is_file():
            return Path(folder) / LAST
    if not folders:
        raise ResumeError("--ckpt_path last needs a checkpoint folder: the run has no ModelCheckpoint with a dirpath; "
                          "pass the checkpoint file as --ckpt_path, or drop --ckpt_path to start a new run")
    seen = []
    for folder in folders:
        folder = Path(folder)
        others = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        cut = [p.name for p in leftover_temporaries(folder) if p.name.startswith(f".{LAST}.")]
        if cut:
            seen.append(f"{folder} holds only {', '.join(cut)}, a checkpoint cut short while it was being written")
        elif others:
            seen.append(f"{folder} holds {', '.join(others[:4])} but no {LAST} (pass one of them as --ckpt_path)")
        else:  # the folder exists: claim_outputs made it, to lock it
            seen.append(f"{folder} holds no checkpoint")
    raise ResumeError(f"--ckpt_path last found nothing to resume: {'; '.join(seen)}; drop --ckpt_path to start a new "
                      "run")


STRUCTURE = ("lens_type", "offsets", "bias", "prompt_length")
"""Model settings a checkpoint's lenses are made of: they must match to load it at all. (The base
model itself is checked by its unembedding when the checkpoint loads, whatever its name or path.)"""

EXACT_MODEL = ("base.dtype", "cache_dtype", "lens_dtype")
"""Model settings that change the numbers a resumed run computes (``lens_dtype: auto`` is compared
again once resolved on this machine, when the checkpoint loads)."""

DATA_ORDER = ("source", "val_source", "text_field", "split", "mode", "seq_len", "batch_size", "holdout_every",
              "seed", "shuffle_buffer", "max_words", "max_chars", "positions_per_doc", "num_workers")
"""Data settings that decide which samples come next: they must match for an exact resume."""


def _same(saved, wanted) -> bool:
    """Equal settings; a path given relative once and absolute once (or with ``..``) is the same path."""
    if saved == wanted:
        return True
    if isinstance(saved, str) and isinstance(wanted, str) and Path(wanted).exists():
        return Path(saved).resolve() == Path(wanted).resolve()
    return False


_ABSENT = object()


def _get(settings: dict, key: str, default=None):
    """``settings[key]``, following dots into nested groups (``base.dtype``); ``default`` if not there."""
    for part in key.split("."):
        if not isinstance(settings, dict) or part not in settings:
            return default
        settings = settings[part]
    return settings


def _differences(saved: dict, wanted: dict, keys: tuple[str, ...], section: str) -> list[str]:
    found = [(k, _get(saved, k, _ABSENT), _get(wanted, k)) for k in keys]
    return [f"--{section}.{k} {was!r} (this run: {now!r})" for k, was, now in found
            if was is not _ABSENT and not _same(was, now)]


TRAINER = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
"""Trainer settings that shape each gradient step: they must match to resume (a checkpoint of a
gradient-trained lens records them)."""


def _trainer_settings(trainer: dict) -> dict:
    """``--trainer.*`` settings as a checkpoint records them (Lightning's defaults filled in)."""
    return {"accumulate_grad_batches": trainer.get("accumulate_grad_batches") or 1,
            "gradient_clip_val": trainer.get("gradient_clip_val"),
            "gradient_clip_algorithm": str(trainer.get("gradient_clip_algorithm") or "norm").lower()}


def check_resume(path: Path, checkpoint: dict, model: dict, data: dict | None, trainer: dict | None = None,
                 artifact_folders: list[Path] = ()) -> bool:
    """``model`` / ``data`` / ``trainer``: this run's ``--model.*`` / ``--data.*`` / ``--trainer.*``
    settings (``data`` None: not resuming training, only scoring the checkpoint, so the data and
    the training settings may differ). ``artifact_folders``: where the run writes its lens artifacts.

    Resuming continues the checkpoint's run: a setting it would not apply (the checkpoint's optimizer
    state and warm start win) or could not apply exactly is refused with both values, so that what
    the run records (runs/config.yaml, the artifact) is what ran. ``--trainer.max_steps`` is the one
    that may change (to train on): the learning-rate schedule then ends there, which is said in one line.

    Returns whether the checkpoint is the run's final lens (at ``max_steps``) and its artifacts do
    not hold it: the run was cut short after its last checkpoint, before its artifacts were written,
    and the resumed run writes them from the checkpoint instead of training."""
    saved_model = checkpoint.get("hyper_parameters") or {}
    differ = _differences(saved_model, model, STRUCTURE, "model")
    if differ:
        raise ResumeError(f"{path} holds lenses of other settings: the checkpoint has {'; '.join(differ)}; "
                          "pass the checkpoint's settings, or start a new run in another folder")
    if data is None:
        return False
    trainer = trainer or {}
    recipe = RECIPES.get(saved_model.get("lens_type"))
    differ = _differences(saved_model, model, EXACT_MODEL + (recipe.trained_with if recipe else ()), "model")
    differ += _differences(checkpoint.get("datamodule_hyper_parameters") or {}, data, DATA_ORDER, "data")
    saved_trainer = (checkpoint.get("lenscope") or {}).get("trainer") or {}
    differ += _differences(saved_trainer, _trainer_settings(trainer), TRAINER, "trainer")
    if differ:
        raise ResumeError(f"{path} was trained with other settings, so it cannot resume exactly: the checkpoint "
                          f"has {'; '.join(differ)}; pass the checkpoint's settings, or start a new run in another folder")
    step = checkpoint.get("global_step", 0)
    max_steps = trainer.get("max_steps")
    if max_steps is None or step < max_steps:
        before = saved_trainer.get("max_steps")
        if max_steps is not None and before is not None and before != max_steps and recipe and recipe.schedules_lr:
            warmup = saved_model.get("warmup_steps", 0)
            rank_zero_info(f"--trainer.max_steps {max_steps} (the checkpoint's run had {before}): the learning rate "
                           f"now decays to 0 at step {max_steps}, so from step {step} it is "
                           f"{lr_factor(step, warmup, max_steps):.3g}× the configured one "
                           f"(it would have been {lr_factor(step, warmup, before):.3g}×)")
        return False
    written = artifacts_holding(checkpoint, artifact_folders)
    if written or not artifact_folders:
        where = f" (the lens of step {step} is already in {', '.join(str(p) for p in written)})" if written else ""
        raise ResumeError(f"{path} is at step {step} and --trainer.max_steps is {max_steps}: nothing is left to "
                          f"train; raise --trainer.max_steps above {step}{where}")
    if step > max_steps:
        raise ResumeError(f"{path} is at step {step}, past --trainer.max_steps {max_steps}, and its lens is not in "
                          f"the run's artifacts; pass --trainer.max_steps {step} to write them from it, or more to "
                          "train on")
    return True


def lens_keys(checkpoint: dict) -> list[str]:
    """The lenses a checkpoint holds (``tuned``, ``tuned+1``, ...), from its ``lenses.<key>.*`` weights."""
    return sorted({name.split(".")[1] for name in checkpoint.get("state_dict", {}) if name.startswith("lenses.")})


def artifacts_holding(checkpoint: dict, artifact_folders: list[Path]) -> list[Path]:
    """The artifact folders that hold every lens of ``checkpoint`` as of its step (empty if any lens
    is missing or older). An artifact records the step and the tokens its lens was trained on; both
    must be the checkpoint's (a rerun of as many steps on other data has other tokens)."""
    step = checkpoint.get("global_step", 0)
    tokens = sum(checkpoint.get("lenscope", {}).get("tokens_seen_by_rank") or [0])
    holding = []
    for folder in artifact_folders:
        for key in lens_keys(checkpoint):
            try:
                config = json.loads((Path(folder) / key / "config.json").read_text())
            except (OSError, ValueError):
                return []
            if not isinstance(config, dict) or config.get("trained_steps") != step or config.get("tokens_seen") != tokens:
                return []
        holding.append(Path(folder))
    return holding


# --- the step schedule --------------------------------------------------------------------------------
def check_schedule(trainer: dict) -> None:
    """With an endless training stream, validation (and so the results table) is scheduled in steps:
    it must happen, and its last one must score the final lens."""
    max_steps = trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ConfigError(f"--trainer.max_steps must be a positive number of steps, got {max_steps}")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ConfigError(f"--trainer.accumulate_grad_batches must be a whole number of batches >= 1, got {accumulate!r}")
    if trainer.get("limit_val_batches") in (0, 0.0):
        return  # no validation asked for: no results table, the artifact alone
    # Lightning counts val_check_interval in batches: a step is accumulate_grad_batches of them.
    batches = max_steps * accumulate
    per_step = f" ({accumulate} per step)" if accumulate > 1 else ""
    interval = trainer.get("val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ConfigError(f"--trainer.val_check_interval must be a number of batches (the training stream is endless), "
                          f"got {interval!r}; set it to {batches} to validate once at the end")
    if interval > batches:
        raise ConfigError(f"--trainer.val_check_interval {interval} is beyond the {batches} batches{per_step} of "
                          f"--trainer.max_steps {max_steps}: no validation would run and no results would be written; "
                          f"set it to at most {batches}")
    if batches % interval:
        last = batches - batches % interval
        raise ConfigError(f"--trainer.max_steps {max_steps} ({batches} batches{per_step}) is not a multiple of "
                          f"--trainer.val_check_interval {interval}: the last validation (batch {last}) would not score "
                          f"the final lens; make them multiples")


