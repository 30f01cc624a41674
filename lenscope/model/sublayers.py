"""Find each block's MLP, beside its attention (``heads.py``): the sites causal tracing restores.

The MLP of a block is found by what it does, as the attention's output projection is:

* it is a child module of the block that holds weight matrices and does not hold the attention
  output projection;
* its output is d_model wide;
* it is **position-wise**: run on the last position alone, it gives the same output there as in the
  whole sequence. An attention or a recurrent mixer is not position-wise, and it cannot run
  without its other arguments.

A block whose MLP returns its residual sum itself (BLOOM's MLP takes the residual as an argument)
or that has none (a Mamba layer) has no MLP site. The attention site of a block is its output
projection's output, which is the attention's contribution before any post-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lenscope.model.adapter import ArchitectureAdapter
from lenscope.model.heads import AttentionHeads, HeadsError


@dataclass(frozen=True)
class Sublayers:
    heads: AttentionHeads
    mlps: tuple[str | None, ...]
    """Dotted path (from the model) of block b's MLP, or None where it has no position-wise MLP."""
    tuple_outputs: frozenset[str] = frozenset()
    """The MLPs that return a tuple (the state first, e.g. a mixture of experts' router logits after)."""

    def path(self, kind: str, layer: int) -> str:
        """The module whose output is block ``layer``'s ``kind`` ("attention" or "mlp") output."""
        if kind == "attention":
            return self.heads.path(layer)
        if kind != "mlp":
            raise ValueError(f"sublayer kind must be 'attention' or 'mlp', got {kind!r}")
        count = len(self.mlps)
        if not 0 <= layer < count:
            raise HeadsError(f"MLP layer {layer} out of range: blocks are 0..{count - 1}")
        if self.mlps[layer] is None:
            with_mlp = [b for b, p in enumerate(self.mlps) if p is not None]
            raise HeadsError(f"block {layer} has no position-wise MLP lenscope can find; the blocks with one are "
                             f"{with_mlp if with_mlp else 'none'}")
        return self.mlps[layer]  # type: ignore[return-value]

    @classmethod
    def discover(cls, adapter: ArchitectureAdapter, heads: AttentionHeads) -> Sublayers:
        mlps, tuple_outputs = _find_mlps(adapter, heads)
        return cls(heads, tuple(mlps), frozenset(tuple_outputs))


def _find_mlps(adapter: ArchitectureAdapter, heads: AttentionHeads) -> tuple[list[str | None], set[str]]:
    model, d = adapter.model, adapter.d_model
    names = {id(m): n for n, m in model.named_modules()}
    caught: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    order: dict[str, int] = {}
    tuples: set[str] = set()

    def record(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if args and torch.is_tensor(args[0]) and torch.is_tensor(out):
            name = names[id(module)]
            order.setdefault(name, len(order))
            caught.setdefault(name, (args[0].detach(), out.detach()))
            if isinstance(output, (tuple, list)):
                tuples.add(name)

    children = [child for block in adapter.blocks for child in block.children()
                if any(isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2 for m in child.modules())]
    handles = [child.register_forward_hook(record) for child in children]
    param = adapter.unembedding_weight
    ids = (torch.arange(6, device=param.device) * 7 + 3).remainder(adapter.vocab_size).unsqueeze(0)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    found: list[str | None] = []
    for b, block in enumerate(adapter.blocks):
        attention = heads.projections[b] if b < len(heads.projections) else None
        mlp = None
        for child in block.children():
            name = names[id(child)]
            if name not in caught or (attention and attention.startswith(name + ".")):
                continue
            inp, out = caught[name]
            if out.shape[-1] != d or inp.shape[:-1] != out.shape[:-1] or inp.dim() < 2:
                continue
            if _position_wise(child, inp, out) and (mlp is None or order[name] > order[mlp]):
                mlp = name
        found.append(mlp)
    return found, {name for name in tuples if name in found}


@torch.no_grad()
def _position_wise(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> bool:
    try:
        alone = module(inp[..., -1:, :])
    except Exception:  # noqa: BLE001 (needs other arguments: an attention or a mixer, not an MLP)
        return False
    alone = alone[0] if isinstance(alone, (tuple, list)) else alone
    if not torch.is_tensor(alone) or alone.shape != out[..., -1:, :].shape:
        return False
    scale = out.float().abs().max().clamp(min=1e-12)
    return bool((alone.float() - out[..., -1:, :].float()).abs().max() <= 1e-4 * scale)
