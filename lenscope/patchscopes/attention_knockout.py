"""Attention knockout (Geva et al. 2023, "Dissecting Recall"; REFERENCE.md §C): where does the
last position read the answer from?

The edges from the last position to a set of positions are blocked in every attention head of the
``window`` blocks centred on ℓ (the paper: 9), and the probability of the clean prediction is read
again. The change, 100 · (p_blocked − p) / p, per ℓ, for three sets: the subject's tokens, every
other position before the last, and the last position itself. The paper finds the relation
(non-subject) positions matter first, the subject's later.

Blocking works on any attention lenscope finds (``lenscope.model.heads``): the attention module (the
output projection's parent) is called with an attention mask, as every Hugging Face attention is;
a forward pre-hook replaces that mask with the same one (a causal mask where the model passes
none) minus the blocked edges, in the mask's own convention (boolean: False; additive: the dtype's
minimum, i.e. −∞ before the softmax).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Span
from lenscope.model.heads import HeadsError
from lenscope.model.residuals import check_finite_logits
from lenscope.patchscopes.causal_tracing import blocks_or_all, subject_tokens, window_blocks

SETS = ("subject", "non-subject", "last")


def attention_module(model, layer: int):
    """Block ``layer``'s attention: the parent of its output projection, which takes the mask."""
    path = model.heads.path(layer).rsplit(".", 1)[0]
    module = model.hf.get_submodule(path)
    if "attention_mask" not in inspect.signature(module.forward).parameters:
        raise HeadsError(f"the attention of block {layer} ({path}) takes no attention_mask; attention knockout "
                         "cannot block its edges")
    return module


@contextmanager
def blocked_edges(model, blocked: torch.Tensor):
    """Inside the context, the model's forward passes run with attention edges removed.

    blocked: (batch, blocks, T, T) bool, True where the edge from query i to key j is removed in
    that block for that row (the batch must be the next passes' batch, T their length).
    """
    handles = []
    for layer in blocked.any(-1).any(-1).any(0).nonzero().flatten().tolist():
        def hook(module, args, kwargs, layer=layer):
            if "attention_mask" not in kwargs:
                raise HeadsError(f"the attention of block {layer} got its mask positionally; attention knockout "
                                 "replaces the attention_mask keyword")
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _without(kwargs["attention_mask"], blocked[:, layer])
            return args, kwargs
        handles.append(attention_module(model, layer).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _without(mask: torch.Tensor | None, blocked: torch.Tensor) -> torch.Tensor:
    """The model's mask (None: causal) with the ``blocked`` (batch, T, T) edges removed."""
    b, t = blocked.shape[0], blocked.shape[-1]
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=blocked.device).tril()[None, None].expand(b, 1, t, t)
    mask = mask[..., -t:, -t:].expand(b, mask.shape[1], t, t).clone()
    edges = blocked[:, None].to(mask.device)
    if mask.dtype == torch.bool:
        return mask & ~edges
    return mask.masked_fill(edges, torch.finfo(mask.dtype).min)


@torch.no_grad()
def knockout_probabilities(model, ids: torch.Tensor, answer_id: int, blocked: torch.Tensor,
                           rows_per_pass: int = 64) -> torch.Tensor:
    """p(answer) at the last position of ``ids`` (1, T) for each row of ``blocked`` (rows, blocks,
    T, T): (rows,)."""
    out = []
    for first in range(0, blocked.shape[0], rows_per_pass):
        part = blocked[first:first + rows_per_pass]
        batch = ids.expand(part.shape[0], -1)
        with blocked_edges(model, part):
            logits = model.hf(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[:, -1]
        out.append(torch.softmax(logits.float(), -1)[:, answer_id].cpu())
    return torch.cat(out)


@dataclass
class Knockout:
    prompt: str
    tokens: list[str]
    subject: tuple[int, int]
    answer: str
    answer_id: int
    probability: float
    """p(answer) with nothing blocked."""
    layers: list[int]
    """Window centres (block indices)."""
    window: int
    change: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per blocked set, (layers,): 100 · (p_blocked − p) / p."""


def attention_knockout(model, prompt: str, subject: str | Span, window: int = 9, layers: list[int] | None = None,
                       rows_per_pass: int = 64) -> Knockout:
    """The knockout curves of one prompt whose answer is the clean top-1 token; ``subject`` is a span
    of it (``subject_tokens``)."""
    if window < 1:
        raise ConfigError(f"window must be at least 1, got {window}")
    if rows_per_pass < 1:
        raise ConfigError(f"rows_per_pass must be at least 1, got {rows_per_pass}")
    heads = model.heads
    num_blocks = model.num_layers
    layers = blocks_or_all(model, layers)
    ids = model.tokenize(prompt)
    t = ids.shape[1]
    start, end = subject_tokens(model.tokenizer, prompt, subject)
    with torch.no_grad():
        logits = model.hf(input_ids=ids).logits[0, -1]
    # A pass outside the reader: its overflow would give NaN probabilities and an `<unk>` answer.
    check_finite_logits(logits, model.reader, ids)
    probs = torch.softmax(logits.float(), -1)
    answer_id = int(probs.argmax())
    keys = {"subject": list(range(start, end)),
            "non-subject": [j for j in range(t - 1) if not start <= j < end],
            "last": [t - 1]}
    rows, cells = [], []
    for name in SETS:
        if not keys[name]:
            continue
        for i, layer in enumerate(layers):
            edges = torch.zeros(num_blocks, t, t, dtype=torch.bool)
            for b in window_blocks(layer, window, num_blocks):
                if b in heads.layers:  # a recurrent layer of a hybrid has no edges to block
                    edges[b, t - 1, keys[name]] = True
            rows.append(edges)
            cells.append((name, i))
    result = Knockout(prompt, [model.tokenizer.decode([i]) for i in ids[0].tolist()], (start, end),
                      model.tokenizer.decode([answer_id]), answer_id, float(probs[answer_id]), layers, window)
    p = knockout_probabilities(model, ids, answer_id, torch.stack(rows), rows_per_pass) if rows else torch.empty(0)
    base = float(probs[answer_id])
    for name in SETS:
        result.change[name] = torch.full((len(layers),), float("nan"))
    for (name, i), value in zip(cells, p.tolist(), strict=True):
        result.change[name][i] = 100 * (value - base) / base
    return result
