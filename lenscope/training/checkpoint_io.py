"""Checkpoints written so that a crash, a kill or a full disk never damages the last good one.

Lightning's own writer goes through a temporary file in the system temp folder and then *moves*
it, which is a copy (not atomic) when that folder is on another filesystem, and does not fsync.
Here the checkpoint goes through ``lenscope.files.atomic_path``: a temporary file next to its target,
flushed to disk, then one ``os.replace``, so readers see the old checkpoint or the new one, never
half of one. A failed write (full disk, say) removes the temporary file and stops the run with a
one-line message; the previous checkpoint stays intact.
"""

from __future__ import annotations

import errno
import os
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
    """A checkpoint could not be written (earlier checkpoints are untouched) or does not load."""


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
