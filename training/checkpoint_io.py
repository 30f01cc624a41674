"""Checkpoints written so that a crash, a kill or a full disk never damages the last good one.

Lightning's own writer goes through a temporary file in the system temp folder and then *moves*
it, which is a copy (not atomic) when that folder is on another filesystem, and does not fsync.
Here the checkpoint goes to a temporary file next to its target, is flushed to disk, and replaces
the target with one ``os.replace``: readers see the old checkpoint or the new one, never half of
one. A failed write (full disk, say) removes the temporary file and stops the run with a one-line
message; the previous checkpoint stays intact.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lenses.errors import UserError


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (earlier checkpoints are untouched) or does not load."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            # Test hook: widen the window between writing and publishing, so that a test can kill
            # the process in the middle of a checkpoint write.
            if delay := float(os.environ.get("LENSCOPE_TEST_CHECKPOINT_DELAY", "0")):
                time.sleep(delay)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            Path(tmp).unlink(missing_ok=True)
            no_space = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
            reason = "the disk is full" if no_space else str(err).splitlines()[0]
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: {reason}; free space or change the checkpoint "
                "folder (earlier checkpoints are intact)"
            ) from None
