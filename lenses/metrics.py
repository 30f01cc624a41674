"""Per-layer metrics of lenses as one torchmetrics ``Metric``: the one accumulator of training's
held-out scores (KL and cross-entropy per lens) and of the Patchscopes evaluation (precision,
surprisal, KL per method).

Every (metric, method) series and every layer lives in two state tensors (sums and counts), so a
distributed run synchronises once, whatever the number of layers, lenses and metrics.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from lenscope.lenses.lens import residual_name


class PerLayerMeans(Metric):
    """Running per-layer means of named series, e.g. ``("precision@1", "tuned")`` or
    ``("kl_nats", "tuned+1")``."""

    full_state_update = False

    def __init__(self, series: list[tuple[str, str]], num_layers: int, **kwargs):
        super().__init__(**kwargs)
        self.series = list(series)
        self.index = {s: i for i, s in enumerate(self.series)}
        shape = (len(self.series), num_layers)
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, metric: str, method: str, values: torch.Tensor, mask: torch.Tensor | None = None, *,
               count: int | torch.Tensor | None = None) -> None:
        """values: (num_layers, N) per-example values (or (N,), the same for every layer); mask: (N,).
        With ``count``, values are already summed over ``count`` examples: (num_layers,)."""
        i = self.index[(metric, method)]
        values = values.to(self.total.dtype)
        if count is not None:
            self.total[i] += values
            self.count[i] += torch.as_tensor(count, dtype=self.count.dtype, device=self.count.device)
            return
        if values.dim() == 1:
            values = values.expand(self.total.shape[1], -1)
        if mask is not None:
            values = values[:, mask]
        self.total[i] += values.sum(-1)
        self.count[i] += values.shape[-1]

    def compute(self) -> dict[str, dict[str, dict[str, list[float] | int]]]:
        """{"means": {metric: {method: per-layer means}}, "counts": {metric: {method: positions}}}.

        Both come from the synchronised states (torchmetrics syncs for the length of this call
        only, so counts are read here, not from the states afterwards). NaN where nothing was counted.
        """
        means = self.total / self.count
        out: dict[str, dict] = {"means": {}, "counts": {}}
        for (metric, method), i in self.index.items():
            out["means"].setdefault(metric, {})[method] = means[i].tolist()
            out["counts"].setdefault(metric, {})[method] = int(self.count[i, 0])
        return out


def per_layer_table(layers: list[int], columns: dict[str, list]) -> str:
    """The one Markdown table of per-layer results (training's held-out scores, the Patchscopes
    tables, a model card): a row per residual index with its name, a column per series; a value
    missing or NaN reads ``n/a``, numbers have three decimals."""
    def cell(value) -> str:
        return "n/a" if value is None or value != value else f"{value:.3f}"

    lines = ["| residual | layer | " + " | ".join(columns) + " |", "|---:|---|" + "---:|" * len(columns)]
    for i, layer in enumerate(layers):
        lines.append(f"| {layer} | {residual_name(layer)} | " + " | ".join(cell(v[i]) for v in columns.values()) + " |")
    return "\n".join(lines)
