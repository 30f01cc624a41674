"""Lightning's FSDPStrategy on CPU processes (gloo), so that FSDP runs end to end in the tests, and
a callback that records each rank's cache hits.

Lightning refuses FSDP without a GPU, and its strategy hands torch ``device_id=None`` on CPU, which
torch's FSDP refuses too; torch itself runs FSDP on CPU over gloo when given the CPU device. This
subclass lifts only those two refusals: the sharding, the hooks and the checkpoints are Lightning's
and torch's own, as on GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed import fsdp


class _FSDPOnCPU(fsdp.FullyShardedDataParallel):
    def __init__(self, module, *args, device_id=None, **kwargs):
        super().__init__(module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that Lightning lets run on CPU (the accelerator check matches the exact type)."""

    def _setup_model(self, model):
        with mock.patch.object(fsdp, "FullyShardedDataParallel", _FSDPOnCPU):
            return super()._setup_model(model)


class CacheHitRecorder(L.Callback):
    """Writes ``<dirpath>/hits_rank<r>.json``: for each training step of this rank, whether its batch
    came from the hidden-state cache (so a test can see that ranks' hits differed on some step)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.hits: list[bool] = []
        self._before = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = pl_module.cache.hits

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.hits.append(pl_module.cache.hits > self._before)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"hits_rank{trainer.global_rank}.json").write_text(json.dumps(self.hits))
