"""Causal tracing (Meng et al. 2022, ROME; REFERENCE.md §B): which hidden states carry a fact.

The subject's token states at the input (residual 0) get Gaussian noise, ``noise`` × σ with σ the
standard deviation of the model's own input states (3σ as ROME, seeded, the same draws for every
restoration). The model then mostly loses the answer o (the clean run's top-1 token at the last
position). One clean state is restored at a time and the probability of o measured again:

* ``residual``: block ℓ's output at token t;
* ``mlp`` / ``attention``: the MLP's or the attention's output at token t in the ``window`` blocks
  centred on ℓ (ROME: 10), which shows where each kind of sublayer matters.

Every restoration of one kind runs batched through the patching engine: a row per (noise sample,
token, layer), the noise and the restorations as ``Intervention``s. Rows that restore a token
before the subject are not run: nothing there differs from the clean run, so their score is the
corrupted one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Span, find_span
from lenscope.model.patching import Intervention

KINDS = ("residual", "mlp", "attention")


def subject_tokens(tokenizer, prompt: str, subject: str | Span) -> tuple[int, int]:
    """[start, end) token range of ``subject`` in ``prompt``, on token boundaries (``find_span``:
    a subject the prompt repeats is refused unless a ``Span`` names its occurrence)."""
    return find_span(tokenizer, prompt, subject, "subject")


def blocks_or_all(model, layers: list[int] | None) -> list[int]:
    """``layers`` (block indices, checked in one line), or every block."""
    num_blocks = model.num_layers
    layers = list(range(num_blocks)) if layers is None else layers
    bad = [layer for layer in layers if not 0 <= layer < num_blocks]
    if bad:
        raise ConfigError(f"layers {bad} out of range: blocks are 0..{num_blocks - 1}")
    return layers


def window_blocks(layer: int, window: int, num_blocks: int) -> range:
    """The ``window`` blocks centred on ``layer`` (ROME's and Geva et al.'s rule), cut at the ends."""
    return range(max(0, layer - window // 2), min(num_blocks, layer - (-window // 2)))


def input_state_std(model) -> float:
    """σ of the model's input states (residual 0: embeddings with any scale and position embedding
    the family adds), over a fixed sequence of up to 256 tokens spread over the vocabulary."""
    length = min(256, model.context_length or 256)
    ids = (torch.arange(length, device=model.device) * 7919 + 11).remainder(model.vocab_size)[None]
    return float(model.residuals(ids)[0].float().std())


@dataclass
class Trace:
    prompt: str
    tokens: list[str]
    subject: tuple[int, int]
    """[start, end) token range of the subject."""
    answer: str
    answer_id: int
    clean: float
    """p(answer) in the clean run."""
    corrupted: float
    """p(answer) with the subject corrupted, nothing restored (the mean over noise samples)."""
    noise_std: float
    """σ of the model's input states; the noise drawn has standard deviation ``noise`` · σ."""
    layers: list[int]
    """Block indices (columns): a residual row restores block ℓ's output (residual ℓ + 1)."""
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per kind, (tokens, layers): p(answer) with that state restored, mean over noise samples."""
    window: int = 10
    noise: float = 3.0

    def indirect_effect(self, kind: str) -> torch.Tensor:
        return self.scores[kind] - self.corrupted


@torch.no_grad()
def causal_trace(model, prompt: str, subject: str | Span, kinds: tuple[str, ...] = KINDS, samples: int = 10,
                 noise: float = 3.0, seed: int = 1, window: int = 10, layers: list[int] | None = None,
                 rows_per_pass: int = 128, noise_std: float | None = None) -> Trace:
    """Trace one fact: ``prompt`` ends where the model gives the answer, ``subject`` is a span of it
    (``subject_tokens``)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"kinds {unknown} unknown: choose among {list(KINDS)}")
    if samples < 1 or window < 1:
        raise ConfigError(f"samples and window must be at least 1, got {samples} and {window}")
    if rows_per_pass < 1:  # the passes hold at least one sample set each: 0 or less would be ignored silently
        raise ConfigError(f"rows_per_pass must be at least 1, got {rows_per_pass}")
    num_blocks = model.num_layers
    layers = blocks_or_all(model, layers)
    ids = model.tokenize(prompt)
    if model.context_length and ids.shape[1] > model.context_length:
        raise ConfigError(f"the prompt has {ids.shape[1]} tokens, more than the model's context of {model.context_length}")
    start, end = subject_tokens(model.tokenizer, prompt, subject)
    t_len = ids.shape[1]
    last = torch.tensor([t_len - 1], device=model.device)
    clean_probs = torch.softmax(model.engine.forward(ids, None, [], last).float(), -1)[0]
    answer_id = int(clean_probs.argmax())
    sigma = input_state_std(model) if noise_std is None else noise_std
    generator = torch.Generator().manual_seed(seed)
    draws = (torch.randn(samples, end - start, model.d_model, generator=generator) * noise * sigma).to(model.device)
    clean = {"residual": model.residuals(ids)[:, 0]}  # (L + 1, T, d)
    for kind in kinds:
        if kind != "residual":
            clean[kind] = model.engine.sublayer_outputs(kind, ids)[:, 0]  # (blocks, T, d)
    corrupted = restored_probabilities(model, ids, draws, start, [[]], answer_id, rows_per_pass)[0]
    trace = Trace(prompt, [model.tokenizer.decode([i]) for i in ids[0].tolist()], (start, end),
                  model.tokenizer.decode([answer_id]), answer_id, float(clean_probs[answer_id]), corrupted,
                  sigma, layers, window=window, noise=noise)
    for kind in kinds:
        restorations, cells = [], []
        for t in range(start, t_len):
            for j, layer in enumerate(layers):
                if kind == "residual":
                    restorations.append([Restore(layer + 1, t, clean[kind][layer + 1, t])])
                else:
                    restorations.append([Restore(b, t, clean[kind][b, t], kind)
                                         for b in window_blocks(layer, window, num_blocks)])
                cells.append((t, j))
        scores = torch.full((t_len, len(layers)), corrupted)
        restored = restored_probabilities(model, ids, draws, start, restorations, answer_id, rows_per_pass)
        for (t, j), p in zip(cells, restored, strict=True):
            scores[t, j] = p
        trace.scores[kind] = scores
    return trace


@dataclass(frozen=True)
class Restore:
    """One clean state put back: at residual ``layer`` (or block ``layer``'s ``sublayer`` output),
    token ``position``."""

    layer: int
    position: int
    value: torch.Tensor
    sublayer: str | None = None


def restored_probabilities(model, ids: torch.Tensor, draws: torch.Tensor, start: int,
                           restorations: list[list[Restore]], answer_id: int, rows_per_pass: int = 128) -> list[float]:
    """p(answer) at the last position of ``ids`` (1, T) with ``draws`` (samples, span, d_model)
    added to the input states from token ``start`` on, averaged over the samples, for each list of
    restorations (an empty list: the corrupted run)."""
    samples, span = draws.shape[0], draws.shape[1]
    per_pass = max(1, rows_per_pass // samples)
    out = []
    for first in range(0, len(restorations), per_pass):
        chunk = restorations[first:first + per_pass]
        n = len(chunk) * samples
        batch = ids.expand(n, -1)
        rows = torch.arange(n, device=ids.device)
        noise_rows = rows.repeat_interleave(span)
        noise_positions = (torch.arange(span, device=ids.device) + start).repeat(n)
        changes = [Intervention(0, noise_rows, noise_positions, draws.repeat(len(chunk), 1, 1).flatten(0, 1), add=True)]
        for c, templates in enumerate(chunk):
            mine = rows[c * samples:(c + 1) * samples]
            for restore in templates:
                changes.append(Intervention(restore.layer, mine, torch.full_like(mine, restore.position),
                                            restore.value.expand(samples, -1), sublayer=restore.sublayer))
        logits = model.engine.forward(batch, None, changes, torch.full((n,), ids.shape[1] - 1, device=ids.device))
        p = torch.softmax(logits.float(), -1)[:, answer_id].reshape(len(chunk), samples).mean(1)
        out += p.tolist()
    return out
