"""Checkpoints written so that a crash, a kill or a full disk never damages the last good one.

Lightning's own writer goes through a temporary file in the system temp folder and then *moves*
it, which is a copy (not atomic) when that folder is on another filesystem, and does not fsync.
Here the checkpoint goes through ``lenscope.files.atomic_path``: a temporary file next to its target,
flushed to disk, then one ``os.replace``, so readers see the old checkpoint or the new one, never
half of one. A failed write (full disk, say) removes the temporary file and stops the run with a
one-line message; the previous checkpoint stays intact.

Every checkpoint is read by ``read_checkpoint``, never by a plain ``torch.load``: the preflight's
look at ``--ckpt_path`` and Lightning's own restore (``AtomicCheckpointIO.load_checkpoint``) alike.
A checkpoint may come from someone else, and unpickling it could run any code it names.
"""

from __future__ import annotations

import errno
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lenscope.errors import UserError
from lenscope.files import atomic_path

HOLD_ENV = "LENSCOPE_TEST_HOLD_CHECKPOINT_AT_STEP"
"""Test hook: when the checkpoint of this step has been written to its temporary file, but before
it replaces the previous one, create ``<temporary>.held`` and wait forever, so that a test can kill
the process at exactly that moment (no timing involved)."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (earlier checkpoints are untouched)."""


class CheckpointReadError(UserError):
    """A file given as a checkpoint does not load, or holds more than a lenscope checkpoint does (and was not loaded)."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """The checkpoint at ``path``, unpickled with ``weights_only=True``: tensors, dtypes, plain
    containers, numbers and strings, which is all a lenscope checkpoint holds (every lens kind,
    with every logger, loads without an allow-list of other types; tests/test_safety_resume.py
    checks them). A file whose pickle names anything else (a class, ``os.system``) is refused
    before any of it runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        try:  # which globals it names, read from the pickle's opcodes without running them
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not even a torch archive: damaged, reported below
            unsafe = []
        if unsafe:
            shown = ", ".join(unsafe[:3]) + (", …" if len(unsafe) > 3 else "")
            raise CheckpointReadError(
                f"{path} is not a lenscope checkpoint and was not loaded: it names {shown}, which a lenscope "
                "checkpoint never holds (loading it could run code); pass a .ckpt written by `lenscope train`"
            ) from None
        damaged = "its pickle is damaged"
    except Exception as err:  # torch raises several types for a damaged file
        damaged = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'damaged'}"
    raise CheckpointReadError(f"checkpoint {path} does not load ({damaged}); it was cut short or modified: "
                              "pass an earlier --ckpt_path or delete it to start over")


def _hold_for_test(checkpoint: dict, tmp: Path) -> None:
    step = os.environ.get(HOLD_ENV)
    if step is not None and checkpoint.get("global_step") == int(step):
        Path(f"{tmp}.held").touch()
        while True:
            time.sleep(1)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
                _hold_for_test(checkpoint, tmp)
        except (OSError, RuntimeError) as err:
            no_space = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
            reason = "the disk is full" if no_space else str(err).splitlines()[0]
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: {reason}; free space or change the checkpoint "
                "folder (earlier checkpoints are intact)"
            ) from None

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's restore (``fit``/``validate`` with ``ckpt_path``, a SLURM requeue) reads through
        here: always ``read_checkpoint``, whatever ``weights_only`` Lightning passes."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")  # what Lightning's own reader raises
        return read_checkpoint(path, map_location if map_location is not None else "cpu")
