"""Attribute extraction (Patchscopes §4.2): can the subject's hidden state alone answer a relation?

For each relation, the target is a zero-shot prompt ending in the placeholder ("The official
currency of x"); the source is a sentence that mentions the subject, read at the subject's last
token. The state at source layer ℓ is written over the placeholder at target layer ℓ*, the model
continues greedily (``max_new_tokens``), and the fact counts as extracted when the object appears
in the continuation (spaces removed, case-sensitive, as the paper's code). Only facts the
unpatched model answers (the template with the real subject) are scored; a source layer counts
as correct for a fact if any target layer extracts it.

Beside it, the paper's baseline (Table 2): a logistic-regression probe per layer on the same
states, one class per object, cross-validated (``probe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenscope.lenses.patchscope import Generate, Patchscope, Source, Target, find_span
from lenscope.patchscopes.facts import PLACEHOLDER, Fact, FactSet
from lenscope.patchscopes.probe import probe_accuracy


def mentions(generation: str, obj: str) -> bool:
    """The paper's success test: the object, spaces removed, inside the generation, spaces removed."""
    return obj.replace(" ", "") in generation.replace(" ", "")


@torch.no_grad()
def greedy_continuations(model, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The unpatched model's greedy continuation of each prompt (batched, left-padded)."""
    tokenizer = model.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # `generate` runs outside the reader: read the prompts' states once through it, so that a model
    # whose states overflow stops here, naming the layer, instead of answering no fact (NaN logits
    # decode to token 0) and leaving every relation unscored. One pass without the head, before
    # max_new_tokens passes with it.
    model.reader.read(batch["input_ids"], batch["attention_mask"])
    out = model.hf.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@dataclass
class RelationResult:
    relation: str
    kind: str
    facts: int
    """Facts of the relation in the set."""
    answered: list[Fact]
    """The facts the unpatched model answers: the ones scored."""
    source_layers: list[int]
    target_layers: list[int]
    heatmap: torch.Tensor | None = None
    """(source layers, target layers): the share of answered facts extracted at (ℓ, ℓ*)."""
    patchscope: torch.Tensor | None = None
    """(source layers,): the share extracted at some target layer."""
    probe: torch.Tensor | None = None
    """(source layers,): the probe's cross-validated accuracy."""

    def summary(self) -> dict:
        def mean_std(values):
            if values is None or values.numel() == 0:
                return None, None
            return float(values.mean()), float(values.std(unbiased=False))

        patch_mean, patch_std = mean_std(self.patchscope)
        probe_mean, probe_std = mean_std(self.probe)
        return {"relation": self.relation, "kind": self.kind, "facts": self.facts, "answered": len(self.answered),
                "patchscope_mean": patch_mean, "patchscope_std": patch_std, "probe_mean": probe_mean, "probe_std": probe_std}


def attribute_extraction(model, facts: FactSet, relations: list[str] | None = None,
                         source_layers: list[int] | None = None, target_layers: list[int] | None = None,
                         max_new_tokens: int = 20, rows_per_pass: int = 256, probe_folds: int = 5,
                         seed: int = 0, on_relation=None) -> list[RelationResult]:
    """Run the experiment on ``model``; layers are residual indices (default: 0 … L − 1, the
    paper's [0, L − 2] block outputs plus the embeddings). ``on_relation(result)`` is called as
    each relation finishes (progress for a long sweep)."""
    source_layers = list(model.layers if source_layers is None else source_layers)
    target_layers = list(model.layers if target_layers is None else target_layers)
    names = relations or list(facts.relations)
    # Every span is looked up before any generation: a fact whose subject its sentence repeats, or
    # holds only inside a word, stops the run at once and not after the relations before it.
    for name in names:
        find_span(model.tokenizer, facts.relations[name].template, PLACEHOLDER, f"relation {name!r}: placeholder")
        for fact in facts.of(name):
            find_span(model.tokenizer, fact.source, fact.subject, f"relation {name!r}: subject")
    results = []
    for name in names:
        relation = facts.relations[name]
        pool = facts.of(name)
        answers = greedy_continuations(model, [relation.prompt(f.subject) for f in pool], max_new_tokens)
        answered = [f for f, text in zip(pool, answers, strict=True) if mentions(text, f.object)]
        result = RelationResult(name, relation.kind, len(pool), answered, source_layers, target_layers)
        results.append(result)
        if answered:
            _extract(model, relation, result, max_new_tokens, rows_per_pass, probe_folds, seed)
        if on_relation is not None:
            on_relation(result)
    return results


def _extract(model, relation, result: RelationResult, max_new_tokens: int, rows_per_pass: int, probe_folds: int,
             seed: int) -> None:
    """The sweep and the probe of one relation's answered facts, into ``result``."""
    answered, source_layers, target_layers = result.answered, result.source_layers, result.target_layers
    scope = Patchscope(Source([f.source for f in answered], source_layers, position=[f.subject for f in answered]),
                       Target(relation.template, layers=target_layers, placeholder=PLACEHOLDER),
                       readout=Generate(max_new_tokens=max_new_tokens, stop=None), rows_per_pass=rows_per_pass)
    states, _ = scope.read(model)  # the subjects' states: what both the patchscope and the probe see
    run = scope.patch(model, states, source_layers)
    hits = torch.tensor([[mentions(text, f.object) for text, f in zip(texts, answered, strict=True)]
                         for texts in run.texts], dtype=torch.float32)  # (pairs, facts)
    hits = hits.view(len(source_layers), len(target_layers), len(answered))
    result.heatmap = hits.mean(-1)
    result.patchscope = hits.amax(1).mean(-1)
    classes = {obj: i for i, obj in enumerate(sorted({f.object for f in answered}))}
    if len(answered) >= 2 and len(classes) >= 2:
        labels = torch.tensor([classes[f.object] for f in answered])
        result.probe = probe_accuracy(states.float().cpu(), labels, folds=probe_folds, seed=seed)

