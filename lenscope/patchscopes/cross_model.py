"""Cross-model patching (Patchscopes §4.4): read model M's state, write it into model M*.

M and M* may differ in width, depth, family and tokenizer. An affine map from M's residual index ℓ
to M*'s ℓ* is fitted by least squares (float64 normal equations, as the affine lens) on the same
text run through both models, at the positions where both tokenisers agree on the prefix: token i
of M and token j of M* end at the same character, so both have read exactly the same text.

Evaluation follows the next-token protocol of the same paper (REFERENCE.md §4): one position per
evaluation document (training's seeded trimming rule on M's tokens, moved back to the nearest
aligned position), M's state h_ℓ mapped and written into M*'s pass over the same text at (ℓ*, j),
and M*'s next-token prediction there compared with M's own: precision@1 (the argmaxes agree) and
surprisal (−ln p_M of M*'s argmax, in nats). When the vocabularies differ, M*'s token is read in
M's vocabulary as the first token of its text.

With M* = M (all this machine can run): the fitted map at ℓ* = ℓ is the identity up to the ridge
term, so the diagonal is the model's own prediction, and the column ℓ* = L is the affine lens of
``lenscope evaluate`` fitted on the same positions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lenscope.datamodules.patchscope_data import document_sample
from lenscope.datamodules.preprocessing import TrimSettings
from lenscope.errors import ConfigError
from lenscope.files import atomic_path
from lenscope.lenses.least_squares import NormalEquations
from lenscope.lenses.patchscope import Patchscope, Target

MAP_FILE = "map.safetensors"


@dataclass
class AlignedDocument:
    """One text as both models read it."""

    ordinal: int
    source_ids: list[int]
    target_ids: list[int]
    pairs: list[tuple[int, int]]
    """(i, j): token i of M and token j of M* end at the same character (> 0)."""


def token_ends(tokenizer, text: str, max_tokens: int) -> tuple[list[int], dict[int, int]]:
    """(ids, {end character: index of the last token ending there}) of ``text``'s first
    ``max_tokens`` tokens. Special tokens (empty spans) end nowhere."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} gives no character offsets; cross-model alignment needs a fast "
                          "(Rust) tokenizer for both models")
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_tokens], encoded["offset_mapping"][:max_tokens]
    ends = {}
    for index, (a, b) in enumerate(offsets):
        if b > a:
            ends[b] = index  # the last of several tokens ending at one character (a split multi-byte character)
    return ids, ends


def align(source_tokenizer, target_tokenizer, text: str, ordinal: int = 0, max_tokens: int = 1024) -> AlignedDocument:
    """``text`` tokenised by both models, with the positions where both have read the same prefix."""
    source_ids, source_ends = token_ends(source_tokenizer, text, max_tokens)
    target_ids, target_ends = token_ends(target_tokenizer, text, max_tokens)
    pairs = [(source_ends[end], target_ends[end]) for end in sorted(set(source_ends) & set(target_ends))]
    return AlignedDocument(ordinal, source_ids, target_ids, pairs)


class CrossModelMap:
    """Affine maps h ↦ A h + b from M's residual index ℓ to M*'s ℓ*, for every (ℓ, ℓ*) of a grid;
    a patchscope mapping (``f(h, ℓ, ℓ*)``). ``weight`` (S, T, d*, d), ``bias`` (S, T, d*)."""

    def __init__(self, source_layers: list[int], target_layers: list[int], weight: torch.Tensor, bias: torch.Tensor,
                 meta: dict | None = None):
        self.source_layers, self.target_layers = list(source_layers), list(target_layers)
        self.weight, self.bias = weight, bias
        self.meta = dict(meta or {})

    @property
    def d_source(self) -> int:
        return self.weight.shape[-1]

    @property
    def d_target(self) -> int:
        return self.weight.shape[-2]

    def __call__(self, h: torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor:
        if source_layer not in self.source_layers or target_layer not in self.target_layers:
            raise ConfigError(f"the cross-model map covers source layers {self.source_layers} and target layers "
                              f"{self.target_layers}, not ({source_layer}, {target_layer}); fit it on those layers")
        s, t = self.source_layers.index(source_layer), self.target_layers.index(target_layer)
        weight, bias = self.weight[s, t].to(h.device), self.bias[s, t].to(h.device)
        return (h.to(weight.dtype) @ weight.T + bias).to(h.dtype)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        meta = {**self.meta, "source_layers": self.source_layers, "target_layers": self.target_layers}
        with atomic_path(path) as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(tmp),
                      metadata={"lenscope": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CrossModelMap:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                meta = json.loads((file.metadata() or {}).get("lenscope", "null"))
                weight, bias = file.get_tensor("weight"), file.get_tensor("bias")
        except FileNotFoundError:
            raise ConfigError(f"cross-model map {path} does not exist; fit one with `lenscope patchscope cross-model`") from None
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as err:
            raise ConfigError(f"{path} is not a cross-model map written by lenscope ({err}); fit it again") from None
        if not isinstance(meta, dict) or "source_layers" not in meta:
            raise ConfigError(f"{path} is not a cross-model map written by lenscope (no layer metadata); fit it again")
        return cls(meta.pop("source_layers"), meta.pop("target_layers"), weight, bias, meta)

    def check(self, source, target) -> None:
        """One line if this map was not fitted between models of these widths."""
        if (self.d_source, self.d_target) != (source.d_model, target.d_model):
            raise ConfigError(f"the cross-model map maps width {self.d_source} to {self.d_target}, but the models have "
                              f"{source.d_model} and {target.d_model}; fit a map between these two models")


def aligned_documents(source, target, texts: list[tuple[int, str]], max_tokens: int) -> list[AlignedDocument]:
    docs = [align(source.tokenizer, target.tokenizer, text, ordinal, max_tokens) for ordinal, text in texts]
    return [d for d in docs if d.pairs]


def _batches(docs: list, size: int):
    for start in range(0, len(docs), size):
        yield docs[start:start + size]


@torch.no_grad()
def fit_cross_model_map(source, target, docs: list[AlignedDocument], source_layers: list[int],
                        target_layers: list[int], ridge: float = 1e-6, batch_size: int = 8,
                        positions: str = "all", seed: int = 42) -> CrossModelMap:
    """Least squares from M's states at ``source_layers`` to M*'s at ``target_layers`` over the
    aligned positions of ``docs`` (``all``, or ``one`` per document as the paper's code). The
    ridge is per coordinate (``NormalEquations.solve``); smaller than the affine lens's 1e-3, as the
    fit has many positions and a map between equal states must stay the identity."""
    if positions not in ("all", "one"):
        raise ConfigError(f"fit positions must be 'all' or 'one', got {positions!r}")
    if not docs:
        raise ConfigError("no fitting document has a position where both tokenisers agree; give more or other text")
    num_s, num_t, d_target = len(source_layers), len(target_layers), target.d_model
    # One system per source layer; its right-hand side holds every target layer side by side.
    equations = NormalEquations(num_s, source.d_model, source.device, d_out=num_t * d_target)
    s_index = torch.tensor(source_layers, device=source.device)
    t_index = torch.tensor(target_layers, device=target.device)
    for batch in tqdm(list(_batches(docs, batch_size)), desc="Fitting the cross-model maps", leave=False):
        chosen = [d.pairs if positions == "all" else [random.Random(f"{seed}/{d.ordinal}").choice(d.pairs)] for d in batch]
        rows = torch.tensor([b for b, pairs in enumerate(chosen) for _ in pairs])
        at_s = torch.tensor([i for pairs in chosen for i, _ in pairs])
        at_t = torch.tensor([j for pairs in chosen for _, j in pairs])
        source_residuals = source.residuals_of([d.source_ids for d in batch])
        target_residuals = source_residuals if target is source else target.residuals_of([d.target_ids for d in batch])
        h = source_residuals[s_index[:, None], rows[None], at_s[None]]  # (S, P, d)
        y = target_residuals[t_index[:, None], rows[None], at_t[None]]  # (T, P, d*)
        equations.update(h, y.permute(1, 0, 2).reshape(len(rows), num_t * d_target).to(h.device))
    weight, bias = equations.solve(ridge)  # (S, T·d*, d), (S, T·d*)
    meta = {"source_model": source.name, "target_model": target.name, "fit_positions": equations.count,
            "fit_documents": len(docs), "ridge": ridge, "underdetermined": equations.underdetermined}
    return CrossModelMap(source_layers, target_layers, weight.view(num_s, num_t, d_target, -1).cpu(),
                         bias.view(num_s, num_t, d_target).cpu(), meta)


def token_translation(source_tokenizer, target_tokenizer):
    """f(ids of M*'s vocabulary) → the same tokens in M's vocabulary: themselves when the two
    vocabularies are one; otherwise the first of M's tokens of each token's text (−1 if none)."""
    if source_tokenizer.get_vocab() == target_tokenizer.get_vocab():
        return lambda ids: ids
    memo: dict[int, int] = {}

    def translate(ids: torch.Tensor) -> torch.Tensor:
        out = []
        for t in ids.flatten().tolist():
            if t not in memo:
                if t == target_tokenizer.eos_token_id and source_tokenizer.eos_token_id is not None:
                    memo[t] = source_tokenizer.eos_token_id
                else:
                    text = target_tokenizer.decode([t])
                    first = source_tokenizer(text, add_special_tokens=False)["input_ids"][:1] if text else []
                    memo[t] = first[0] if first else -1
            out.append(memo[t])
        return torch.tensor(out, device=ids.device).view(ids.shape)

    return translate


@dataclass
class CrossModelResult:
    source_layers: list[int]
    target_layers: list[int]
    precision: torch.Tensor
    """(S, T) precision@1 against M's own prediction."""
    surprisal: torch.Tensor
    """(S, T) mean −ln p_M(M*'s argmax), nats."""
    positions: int
    """Evaluation positions (documents)."""
    identity_error: dict[int, float]
    """ℓ → mean ‖f(h) − h‖ / ‖h‖ of the map at ℓ* = ℓ on the evaluation states (same width only)."""
    model_surprisal: float
    """M's own −ln p(argmax) at the same positions: the surprisal of a perfect method."""


def read_position(doc: AlignedDocument, seed: int, trim: TrimSettings) -> tuple[int, int] | None:
    """The evaluation position: the one training's seeded trimming rule picks in M's tokens, or the
    aligned position nearest before it."""
    sample = document_sample(doc.source_ids, doc.ordinal, trim, seed, 0)
    if sample is None:
        return None
    chosen = sample["positions"][0]
    before = [(i, j) for i, j in doc.pairs if i <= chosen and j < len(doc.target_ids)]
    return before[-1] if before else None


@torch.no_grad()
def evaluate_cross_model(source, target, mapping: CrossModelMap, docs: list[AlignedDocument], seed: int = 42,
                         trim: TrimSettings = TrimSettings(), batch_size: int = 8,  # noqa: B008
                         rows_per_pass: int = 256) -> CrossModelResult:
    mapping.check(source, target)
    s_layers, t_layers = mapping.source_layers, mapping.target_layers
    num_s, num_t = len(s_layers), len(t_layers)
    scope = Patchscope(target=Target(layers=t_layers), mapping=mapping, rows_per_pass=rows_per_pass)
    translate = token_translation(source.tokenizer, target.tokenizer)
    hits = torch.zeros(num_s, num_t, dtype=torch.float64)
    surprisal = torch.zeros(num_s, num_t, dtype=torch.float64)
    surprisal_count = torch.zeros(num_s, num_t, dtype=torch.float64)
    same_width = source.d_model == target.d_model
    identity = {layer: 0.0 for layer in s_layers if layer in t_layers} if same_width else {}
    model_surprisal, count = 0.0, 0
    chosen = [(d, p) for d in docs if (p := read_position(d, seed, trim)) is not None]
    if not chosen:
        raise ConfigError("no evaluation document has a position where both tokenisers agree; give more or other text")
    s_index = torch.tensor(s_layers, device=source.device)
    for batch in tqdm(list(_batches(chosen, batch_size)), desc="Patching the evaluation documents", leave=False):
        rows = torch.arange(len(batch), device=source.device)
        at = torch.tensor([i for _, (i, _) in batch], device=source.device)
        residuals = source.residuals_of([d.source_ids for d, _ in batch])
        states = residuals[s_index[:, None], rows[None], at[None]]  # (S, B, d)
        own = source.log_probs(residuals[-1][rows, at])  # (B, V) M's own prediction
        own_top = own.argmax(-1)
        model_surprisal += float(-own.gather(-1, own_top[:, None]).sum())
        prompts = [d.target_ids[: j + 1] for d, (_, j) in batch]
        logits = scope.patch(target, states, s_layers, own_prompts=prompts).logits  # (S·T, B, V*)
        top = translate(logits.argmax(-1)).view(num_s, num_t, len(batch)).to(own.device)
        hits += (top == own_top).double().sum(-1).cpu()
        known = top >= 0
        logp = own.T[top.clamp(min=0), rows.view(1, 1, -1).expand_as(top)]  # (S, T, B)
        surprisal += (-logp * known).double().sum(-1).cpu()
        surprisal_count += known.double().sum(-1).cpu()
        for layer in identity:
            h = states[s_layers.index(layer)]
            mapped = mapping(h, layer, layer)
            identity[layer] += float(((mapped - h).norm(dim=-1) / h.norm(dim=-1)).sum())
        count += len(batch)
    return CrossModelResult(s_layers, t_layers, (hits / count).float(), (surprisal / surprisal_count).float(), count,
                            {layer: total / count for layer, total in identity.items()}, model_surprisal / count)
