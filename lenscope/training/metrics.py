"""Per-layer lens metrics as one torchmetrics ``Metric`` with vector states.

All layers live in the same state tensors, so a distributed run synchronises once per compute, not
once per layer.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

NATS_PER_BIT = math.log(2)


class PerLayerLensMetrics(Metric):
    """Accumulates Σ KL(final ‖ lens) and Σ cross-entropy vs the next token, per layer."""

    full_state_update = False

    def __init__(self, num_layers: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("kl", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ce", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_labels", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: dict[str, torch.Tensor]) -> None:
        self.kl += sums["kl"].to(self.kl)
        self.ce += sums["ce"].to(self.ce)
        self.n_tokens += sums["n_tokens"].to(self.n_tokens)
        self.n_labels += sums["n_labels"].to(self.n_labels)

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-layer means; NaN where nothing was counted (no labelled position: no cross-entropy,
        rather than a misleading 0)."""
        kl = self.kl / self.n_tokens
        ce = self.ce / self.n_labels
        return {"kl_nats": kl, "kl_bits": kl / NATS_PER_BIT, "ce_nats": ce, "ce_bits": ce / NATS_PER_BIT}
