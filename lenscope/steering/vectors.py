"""Task-encoding vectors (REFERENCE.md §D): the h-vector and function vectors, measured by how much
of an in-context task they carry into a zero-shot prompt.

* **h-vector** (the nnsight / ARENA demo): the residual at the last token of clean ICL prompts,
  averaged over prompts, per layer; added at the same layer to the last token of a zero-shot
  prompt.
* **Function vector** (Todd et al. 2024): each head's output (the attention output projection's
  input, split by head) at the last token, averaged over clean prompts; its **indirect effect** is
  how much writing that mean into a shuffled-label prompt raises the probability of the right
  answer (a probability difference, as the paper's code); the function vector is the sum, through
  the output projection, of the top heads' means (no bias: the paper's code adds a biased
  projection's bias once per head, a quirk not kept), added at one residual layer.

Accuracy is top-1 of the answer's first token. Layers of vectors are residual indices (0 = the
embeddings, j = block j − 1's output); a head's layer is its block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from lenscope.errors import ConfigError
from lenscope.model.patching import Intervention
from lenscope.steering.tasks import IclPrompt, TaskPrompts


def answer_token(tokenizer, answer: str) -> int:
    """The token scored: the first of " answer" (the prompt ends in "A:")."""
    ids = tokenizer(" " + answer, add_special_tokens=False).input_ids
    return ids[0]


def encode(model, prompts: list[IclPrompt]) -> tuple[list[list[int]], torch.Tensor]:
    """(token lists of the prompts, (N,) answer tokens)."""
    tokens = [model.tokenizer(p.text).input_ids for p in prompts]
    context = model.context_length
    longest = max(len(t) for t in tokens)
    if context and longest > context:
        raise ConfigError(f"a prompt has {longest} tokens, more than the model's context of {context}; lower --n_shots")
    return tokens, torch.tensor([answer_token(model.tokenizer, p.answer) for p in prompts], device=model.device)


def _padded(model, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask, index of each row's last token)."""
    ids, mask = model.right_padded(token_lists)
    return ids, mask, torch.tensor([len(t) - 1 for t in token_lists], device=model.device)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def last_token_logits(model, token_lists: list[list[int]], layers: list[int | None] | None = None,
                      vectors: dict[int, torch.Tensor] | None = None, rows_per_pass: int = 64) -> torch.Tensor:
    """Next-token logits at each prompt's end, (len(layers), N, vocab): row (j, n) has ``vectors[l]``
    added at residual index l = layers[j] at prompt n's last token (None: nothing added)."""
    layers = layers if layers is not None else [None]
    rows = [(j, n) for j in range(len(layers)) for n in range(len(token_lists))]
    out = torch.empty(len(layers), len(token_lists), model.vocab_size)
    for part in _chunks(len(rows), rows_per_pass):
        chunk = rows[part]
        ids, mask, last = _padded(model, [token_lists[n] for _, n in chunk])
        changes = []
        for j in {j for j, _ in chunk}:
            if layers[j] is None:
                continue
            mine = torch.tensor([r for r, (jj, _) in enumerate(chunk) if jj == j], device=model.device)
            vector = vectors[layers[j]].to(model.device)
            changes.append(Intervention(layers[j], mine, last[mine], vector.expand(len(mine), -1), add=True))
        logits = model.engine.forward(ids, mask, changes, last).float().cpu()
        for r, (j, n) in enumerate(chunk):
            out[j, n] = logits[r]
    return out


@torch.no_grad()
def mean_last_states(model, token_lists: list[list[int]], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Means over prompts at the last token: (the residual at every index (L + 1, d_model), every
    head's output (blocks with heads, num_heads, head_dim))."""
    residual_sum, head_sum = None, None
    for part in _chunks(len(token_lists), batch_size):
        ids, mask, last = _padded(model, token_lists[part])
        rows = torch.arange(ids.shape[0], device=model.device)
        residual = model.residuals(ids, mask)[:, rows, last].double().sum(1)
        heads = model.head_outputs(ids, mask)[:, rows, last].double().sum(1)
        residual_sum = residual if residual_sum is None else residual_sum + residual
        head_sum = heads if head_sum is None else head_sum + heads
    n = len(token_lists)
    dtype = model.adapter.unembedding_weight.dtype
    return (residual_sum / n).to(dtype), (head_sum / n).to(dtype)


@torch.no_grad()
def indirect_effects(model, token_lists: list[list[int]], answers: torch.Tensor, mean_heads: torch.Tensor,
                     rows_per_pass: int = 128, share_prefix: bool = True) -> torch.Tensor:
    """Average indirect effect of every head, (blocks with heads, num_heads): over the (shuffled)
    prompts, p(answer) with the head's mean written at the last token minus p(answer) without.

    Batched: one row per (layer, head), each row its own write; with ``share_prefix`` the tokens
    before the last run once per prompt and every row continues their key/value cache, so a sweep
    costs one prompt pass plus one token per head.
    """
    heads = model.heads
    layers = heads.layers
    sites = [(i, h) for i in range(len(layers)) for h in range(heads.num_heads)]
    total = torch.zeros(len(sites), dtype=torch.float64)
    for tokens, answer in zip(token_lists, answers.tolist(), strict=True):
        ids = torch.tensor([tokens], device=model.device)
        base = model.engine.forward(ids, None, [], torch.tensor([len(tokens) - 1], device=model.device))
        p_base = torch.softmax(base.float(), -1)[0, answer].item()
        prefix = model.prompt_cache(ids[:, :-1]) if share_prefix and len(tokens) > 1 else None
        for part in _chunks(len(sites), rows_per_pass):
            chunk = sites[part]
            k = len(chunk)
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(k)
                step, at, kwargs = ids[:, -1:].expand(k, 1), 0, {"past_key_values": cache}
                mask = torch.ones(k, len(tokens), dtype=torch.long, device=model.device)
            else:
                step, at, kwargs, mask = ids.expand(k, -1), len(tokens) - 1, {}, None
            changes = []
            for i in {i for i, _ in chunk}:
                mine = [r for r, (ii, _) in enumerate(chunk) if ii == i]
                head_ids = torch.tensor([chunk[r][1] for r in mine], device=model.device)
                rows = torch.tensor(mine, device=model.device)
                changes.append(Intervention(layers[i], rows, torch.full_like(rows, at), mean_heads[i, head_ids],
                                            heads=head_ids))
            read = torch.full((k,), step.shape[1] - 1, device=model.device)
            logits = model.engine.forward(step, mask, changes, read, **kwargs)
            total[part] += torch.softmax(logits.float(), -1)[:, answer].double().cpu() - p_base
    return (total / len(token_lists)).reshape(len(layers), heads.num_heads).float()


def top_heads(aie: torch.Tensor, layers: list[int], k: int) -> list[tuple[int, int]]:
    """The k (block, head) pairs with the largest average indirect effect, largest first."""
    order = aie.flatten().argsort(descending=True)[:k].tolist()
    return [(layers[i // aie.shape[1]], i % aie.shape[1]) for i in order]


def function_vector(model, mean_heads: torch.Tensor, chosen: list[tuple[int, int]]) -> torch.Tensor:
    """Σ over the chosen (block, head) of the output projection applied to that head's mean alone:
    (d_model,)."""
    heads = model.heads
    index = {layer: i for i, layer in enumerate(heads.layers)}
    vector = torch.zeros(model.d_model, dtype=torch.float64, device=model.device)
    for layer, head in chosen:
        vector += heads.contribution(model.hf, layer, mean_heads[index[layer]])[head].double()
    return vector.to(mean_heads.dtype)


@dataclass
class SteeringResult:
    """One task on one model: the ICL reference, and zero-shot accuracy per layer with each vector."""

    task: str
    n_shots: int
    layers: list[int]
    """Residual indices the vectors were added at."""
    queries: list[str]
    answers: list[str]
    icl_correct: torch.Tensor
    """(test,) whether the N-shot prompt answers each test query."""
    zero_shot_correct: torch.Tensor
    """(test,) the zero-shot prompt without any vector."""
    hvector_correct: torch.Tensor
    """(layers, test) with the h-vector of that layer added."""
    fv_correct: torch.Tensor
    """(layers, test) with the function vector added at that layer."""
    head_layers: list[int]
    """Blocks with heads (the rows of ``aie``)."""
    aie: torch.Tensor
    """(head layers, num_heads) average indirect effect."""
    top_heads: list[tuple[int, int]]
    n_prompts: int
    generations: list[dict] = field(default_factory=list)
    """A few zero-shot queries continued greedily without and with each vector held at its best layer."""

    def _rate(self, correct: torch.Tensor, only_icl: bool) -> torch.Tensor:
        keep = self.icl_correct if only_icl else torch.ones_like(self.icl_correct)
        return correct[..., keep].float().mean(-1) if keep.any() else torch.full(correct.shape[:-1], float("nan"))

    def best_layer(self, which: str) -> int:
        correct = self.hvector_correct if which == "hvector" else self.fv_correct
        return self.layers[int(self._rate(correct, False).argmax())]

    def summary(self) -> dict:
        out = {"task": self.task, "n_shots": self.n_shots, "test_queries": len(self.queries),
               "icl_correct_queries": int(self.icl_correct.sum()), "n_prompts": self.n_prompts}
        for scope, only in (("all", False), ("icl_correct", True)):
            rates = {"icl": self._rate(self.icl_correct, only).item(), "zero_shot": self._rate(self.zero_shot_correct, only).item()}
            for which, correct in (("hvector", self.hvector_correct), ("function_vector", self.fv_correct)):
                per_layer = self._rate(correct, only)
                best = int(per_layer.nan_to_num(-1).argmax())
                rates[which] = {"best_layer": self.layers[best], "best": per_layer[best].item(),
                                "per_layer": dict(zip(self.layers, per_layer.tolist(), strict=True))}
            out[scope] = rates
        out["top_heads"] = [{"layer": layer, "head": head, "aie": self.aie[self.head_layers.index(layer), head].item()}
                            for layer, head in self.top_heads]
        out["generations"] = self.generations
        return out


def steer_task(model, prompts: TaskPrompts, layers: list[int] | None = None, n_top_heads: int = 10,
               rows_per_pass: int = 128, aie_prompts: int | None = None, generate_examples: int = 5,
               max_new_tokens: int = 12, on_step=None) -> SteeringResult:
    """The whole experiment for one task: ICL reference, h-vectors, indirect effects, the function
    vector, both vectors swept over ``layers`` (residual indices, default 0 … L), and a few held
    generations at each vector's best layer. ``aie_prompts``: shuffled prompts the indirect effects
    are averaged over (default: all; the paper uses 25)."""
    say = on_step or (lambda message: None)
    layers = layers if layers is not None else list(range(model.num_layers + 1))
    bad = [layer for layer in layers if not 0 <= layer <= model.num_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: residual indices are 0..{model.num_layers}")
    total = len(model.heads.layers) * model.heads.num_heads
    if not 1 <= n_top_heads <= total:
        raise ConfigError(f"n_top_heads must be between 1 and the model's {total} attention heads, got {n_top_heads}")
    clean, _ = encode(model, prompts.clean)
    shuffled, shuffled_answers = encode(model, prompts.shuffled)
    zero, zero_answers = encode(model, prompts.zero_shot)
    icl, icl_answers = encode(model, prompts.icl)
    say(f"{prompts.task.name}: ICL reference on {len(icl)} test queries")
    icl_correct = last_token_logits(model, icl, rows_per_pass=rows_per_pass)[0].argmax(-1) == icl_answers.cpu()
    say(f"{prompts.task.name}: means over {len(clean)} clean prompts")
    mean_residual, mean_heads = mean_last_states(model, clean)
    n_aie = len(shuffled) if aie_prompts is None else min(aie_prompts, len(shuffled))
    say(f"{prompts.task.name}: indirect effects of {len(model.heads.layers) * model.heads.num_heads} heads "
        f"over {n_aie} shuffled prompts")
    aie = indirect_effects(model, shuffled[:n_aie], shuffled_answers[:n_aie], mean_heads, rows_per_pass)
    chosen = top_heads(aie, model.heads.layers, n_top_heads)
    fv = function_vector(model, mean_heads, chosen)
    say(f"{prompts.task.name}: zero-shot with each vector at {len(layers)} layers")
    plain = last_token_logits(model, zero, rows_per_pass=rows_per_pass)[0].argmax(-1) == zero_answers.cpu()
    hvec = last_token_logits(model, zero, layers, {j: mean_residual[j] for j in layers}, rows_per_pass).argmax(-1)
    fvec = last_token_logits(model, zero, layers, dict.fromkeys(layers, fv), rows_per_pass).argmax(-1)
    result = SteeringResult(prompts.task.name, prompts.n_shots, layers, [p.query for p in prompts.zero_shot],
                            [p.answer for p in prompts.zero_shot], icl_correct, plain, hvec == zero_answers.cpu(),
                            fvec == zero_answers.cpu(), model.heads.layers, aie, chosen, len(prompts.clean))
    if generate_examples:
        examples = list(range(min(generate_examples, len(zero))))
        texts = {"plain": held_generations(model, [zero[i] for i in examples], None, None, max_new_tokens)}
        for which, vector_at in (("hvector", lambda j: mean_residual[j]), ("function_vector", lambda j: fv)):
            best = result.best_layer(which)
            texts[which] = held_generations(model, [zero[i] for i in examples], best, vector_at(best), max_new_tokens)
        result.generations = [{"query": prompts.zero_shot[i].query, "answer": prompts.zero_shot[i].answer,
                               **{k: v[n] for k, v in texts.items()}} for n, i in enumerate(examples)]
    return result


@torch.no_grad()
def held_generations(model, token_lists: list[list[int]], layer: int | None, vector: torch.Tensor | None,
                     max_new_tokens: int) -> list[str]:
    """Greedy continuations with ``vector`` added at residual ``layer`` at the prompt's last token
    and held on every generated token (nothing added when ``layer`` is None); prompts of equal
    length run together."""
    texts: list[str | None] = [None] * len(token_lists)
    by_length: dict[int, list[int]] = {}
    for n, tokens in enumerate(token_lists):
        by_length.setdefault(len(tokens), []).append(n)
    eos = model.tokenizer.eos_token_id
    for length, members in by_length.items():
        ids = torch.tensor([token_lists[n] for n in members], device=model.device)
        rows = torch.arange(len(members), device=model.device)
        changes = [] if layer is None else [Intervention(layer, rows, torch.full_like(rows, length - 1),
                                                         vector.to(model.device).expand(len(members), -1), add=True)]
        new = model.engine.generate(ids, changes, max_new_tokens, eos_token_id=eos)
        for n, row in zip(members, new.tolist(), strict=True):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts[n] = model.tokenizer.decode(row).split("\n")[0].strip()
    return texts  # type: ignore[return-value]
