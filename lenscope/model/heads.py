"""Find the attention heads of any decoder block: the input of the attention's output projection,
split by head (what Todd et al. 2024 and the nnsight demo call a head's output).

No table of architectures, as for the blocks (``adapter.py``): the output projection is found by
what it does. Each block is run three times on an input the discovery chooses (a forward pre-hook
replaces the block's input, so earlier blocks do not matter):

* X, a random sequence;
* X with only position 0 changed;
* C, one random vector repeated at every position.

Inside the block, the attention's output projection is the first module with a 2-D weight (a
``Linear``, GPT-2's ``Conv1D``, Falcon's own linear) to produce a d_model-wide output from an input
that

* **mixes positions**: its input at the last position changes when only position 0 of the block's
  input changes (a query, key or value projection, an MLP of a parallel block: unchanged), and
* **is a convex mix of values**: under C its input is the same at every position, because every
  value vector is equal and the attention weights sum to 1, whatever the positional scheme
  (RoPE, ALiBi, learned positions all change the weights, not the values). A recurrence (Mamba, an
  RG-LRU) mixes positions too, but its state grows along the sequence: its layers have no heads.

A block with no such module (a Mamba or recurrent layer of a hybrid) has no heads; the number of
heads comes from the config (``num_attention_heads``), the head width from the projection's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lenscope.errors import UserError
from lenscope.model.adapter import ArchitectureAdapter, _text_config


class HeadsError(UserError):
    """The attention heads asked for cannot be found or do not exist; the message says which."""


@dataclass(frozen=True)
class AttentionHeads:
    """Where each block's attention heads are: ``projections[b]`` is the dotted path (from the model)
    of block b's attention output projection, or None for a block without attention."""

    projections: tuple[str | None, ...]
    num_heads: int
    head_dim: int
    """Width of one head's output (the projection's input is ``num_heads × head_dim`` wide)."""

    @property
    def layers(self) -> list[int]:
        """Block indices that have attention heads (all of them, but for hybrids)."""
        return [b for b, path in enumerate(self.projections) if path is not None]

    def projection(self, model: nn.Module, layer: int) -> nn.Module:
        """Block ``layer``'s attention output projection (the module, for its weight)."""
        return model.get_submodule(self.path(layer))

    def path(self, layer: int) -> str:
        self.check(layer)
        return self.projections[layer]  # type: ignore[return-value]

    def check(self, layer: int, head: int | None = None) -> None:
        """One line naming the range when block ``layer`` (or its head ``head``) does not exist."""
        count = len(self.projections)
        if not 0 <= layer < count:
            raise HeadsError(f"attention layer {layer} out of range: blocks are 0..{count - 1} "
                             "(a head's layer is the block it belongs to, not a residual index)")
        if self.projections[layer] is None:
            raise HeadsError(f"block {layer} has no attention heads (a recurrent or state-space layer); "
                             f"the blocks with heads are {_ranges(self.layers)}")
        if head is not None and not 0 <= head < self.num_heads:
            raise HeadsError(f"head {head} out of range: the model has heads 0..{self.num_heads - 1} per layer")

    def contribution(self, model: nn.Module, layer: int, z: torch.Tensor, with_bias: bool = False) -> torch.Tensor:
        """What each head adds to the residual stream: z (..., num_heads, head_dim) → (..., num_heads,
        d_model), the output projection applied to that head's slice alone (no bias unless
        ``with_bias``). Summed over heads, plus the bias once, it is the projection's output."""
        weight, bias = linear_map(self.projection(model, layer), self.num_heads * self.head_dim)
        w = weight.reshape(weight.shape[0], self.num_heads, self.head_dim)  # (d, H, dh)
        out = torch.einsum("...hk,dhk->...hd", z.to(w.dtype), w)
        return out + bias if with_bias else out

    @classmethod
    def discover(cls, adapter: ArchitectureAdapter) -> AttentionHeads:
        model = adapter.model
        name = type(model).__name__
        config = _text_config(model)
        num_heads = getattr(config, "num_attention_heads", None)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise HeadsError(f"{name} has no num_attention_heads in its config: it has no attention heads to read")
        names = {id(m): n for n, m in model.named_modules()}
        found = _find_projections(adapter, names)
        if not any(found):
            raise HeadsError(f"could not find the attention of {name}: no module in its blocks mixes positions "
                             "as softmax attention does (equal values give equal outputs)")
        widths = sorted({width for _, width in filter(None, found)})
        if len(widths) != 1 or widths[0] % num_heads:
            raise HeadsError(f"{name}'s attention output projections take inputs of width {widths}, "
                             f"which do not split into its {num_heads} heads")
        return cls(tuple(f[0] if f else None for f in found), num_heads, widths[0] // num_heads)


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if len(values) <= 8 else f"{values[0]}, {values[1]}, …, {values[-1]}"


@torch.no_grad()
def linear_map(module: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in), bias (out,)) of an affine module, read from what it does rather than how
    it stores them (``nn.Linear`` keeps (out, in), GPT-2's Conv1D (in, out), and square ones look
    alike): its outputs on zero and on the basis vectors."""
    param = module.weight
    inputs = torch.cat([torch.zeros(1, width), torch.eye(width)]).to(param.device, param.dtype)
    out = module(inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return (out[1:] - out[:1]).T, out[0]


def _find_projections(adapter: ArchitectureAdapter, names: dict[int, str]) -> list[tuple[str, int] | None]:
    """Per block: (path of the attention output projection, its input width), or None."""
    model, d = adapter.model, adapter.d_model
    param = adapter.unembedding_weight
    generator = torch.Generator().manual_seed(0)
    tokens = 6
    x = torch.randn(1, tokens, d, generator=generator)
    x_changed = x.clone()
    x_changed[:, 0] = torch.randn(d, generator=generator)
    constant = x[:, :1].expand(1, tokens, d).clone()
    # Scale the inputs like the model's own states at block 0 (embeddings can be tiny or huge).
    with torch.no_grad():
        scale = adapter.model.get_input_embeddings().weight.float().std().item() or 1.0
    runs = [t.mul(scale).to(param.device, param.dtype) for t in (x, x_changed, constant)]

    seen: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    order: dict[str, int] = {}

    def record(module, args, kwargs, output):
        inp = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
        out = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(inp) and torch.is_tensor(out):
            name = names[id(module)]
            order.setdefault(name, len(order))
            seen[-1].setdefault(name, (inp.detach(), out.detach()))

    def replace_input(run: torch.Tensor):
        def hook(module, args, kwargs):
            if args:
                return (run, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": run}
        return hook

    weighted = [m for block in adapter.blocks for m in block.modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    handles = [m.register_forward_hook(record, with_kwargs=True) for m in weighted]
    ids = (torch.arange(tokens, device=param.device) * 7 + 3).remainder(adapter.vocab_size).unsqueeze(0)
    try:
        for run in runs:
            seen.append({})
            pre = [block.register_forward_pre_hook(replace_input(run), with_kwargs=True) for block in adapter.blocks]
            try:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            finally:
                for h in pre:
                    h.remove()
    finally:
        for h in handles:
            h.remove()

    found: list[tuple[str, int] | None] = []
    for block in adapter.blocks:
        prefix = names[id(block)] + "."
        candidates = sorted((n for n in seen[0] if n.startswith(prefix)), key=order.__getitem__)
        path = None
        for n in candidates:
            (inp, out), (inp_changed, _), (inp_constant, _) = seen[0][n], seen[1].get(n, (None, None)), seen[2].get(n, (None, None))
            if out.shape[-1] != d or inp_changed is None or inp_constant is None or inp.shape[-2] != tokens:
                continue
            size = inp.float().abs().max().clamp(min=1e-12)
            mixes = (inp[..., -1, :] - inp_changed[..., -1, :]).float().abs().max() > 1e-4 * size
            spread = (inp_constant - inp_constant[..., :1, :]).float().abs().max()
            convex = spread <= 1e-4 * inp_constant.float().abs().max().clamp(min=1e-12) * (1 if param.dtype == torch.float32 else 50)
            if mixes and convex:
                path = (n, inp.shape[-1])
                break
            if mixes:
                break  # the first mixing module is a recurrence's: this block has no attention heads
        found.append(path)
    return found
