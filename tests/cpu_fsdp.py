"""Lightning's FSDPStrategy on CPU processes (gloo), so that FSDP runs end to end in the tests.

Lightning refuses FSDP without a GPU, and its strategy hands torch ``device_id=None`` on CPU, which
torch's FSDP refuses too; torch itself runs FSDP on CPU over gloo when given the CPU device. This
subclass lifts only those two refusals: the sharding, the hooks and the checkpoints are Lightning's
and torch's own, as on GPUs.
"""

from __future__ import annotations

from unittest import mock

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
