"""Multi-hop queries and the CoT patchscope (Patchscopes §5).

A two-hop query chains two facts of the fact set, the object of the first being the subject of the
second: "The capital city of" (π2) + "the country of the city of Toronto" (π1) asks for Ottawa
through Canada. Three ways to answer it, each a greedy continuation in which the final object
must appear (``max_new_tokens``, the paper: 20):

* vanilla: the query [π2][π1] as it is;
* "think step by step": the query after "Let's think step by step. " (the paper's CoT baseline);
* the CoT patchscope: the query again, with the state of π1's last token (where the bridge entity
  should be resolved) at source layer ℓ written over π2's last token at target layer ℓ* — the
  second hop gets the first hop's answer where it asks its question — then generation after the
  query's end. A query counts as solved if any (ℓ, ℓ*) pair solves it.

The control (not in the paper): the same sweep with the state of another query's π1, one whose
bridge and answer differ. A patch that carries nothing useful can still solve a query (the
unpatched continuation often names the answer, and a hundred slightly perturbed continuations are a
hundred tries), so the CoT patchscope's rate means something only above the control's.

Rates are over the queries whose two single hops the unpatched model answers (each hop's template
with its real subject), as the paper does: a failure then is a failure to compose, not to know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Generate, Patchscope, Source, Target, token_ending
from lenscope.patchscopes.attribute_extraction import greedy_continuations, mentions
from lenscope.patchscopes.facts import PLACEHOLDER, Fact, FactSet

STEP_BY_STEP = "Let's think step by step. "


@dataclass(frozen=True)
class TwoHop:
    first: Fact
    """Subject → bridge entity (its object)."""
    second: Fact
    """Bridge entity → the answer."""
    question: str
    """π2: the second relation's template without its placeholder ("The capital city of")."""
    phrase: str
    """π1: the first relation's question with its real subject ("the country of the city of Toronto")."""

    @property
    def query(self) -> str:
        return f"{self.question} {self.phrase}"

    @property
    def answer(self) -> str:
        return self.second.object


def two_hop_queries(facts: FactSet) -> list[TwoHop]:
    """Every chain of two facts of different relations where the first's object is the second's
    subject, in the order of the set."""
    by_subject: dict[str, list[Fact]] = {}
    for fact in facts.facts:
        by_subject.setdefault(fact.subject, []).append(fact)
    queries = []
    for first in facts.facts:
        for second in by_subject.get(first.object, []):
            if second.relation == first.relation:
                continue
            question = facts.relations[second.relation].template[: -len(PLACEHOLDER)].rstrip()
            phrase = facts.relations[first.relation].prompt(first.subject)
            if phrase.startswith("The "):  # the query reads as one noun phrase: "… of the country of …"
                phrase = "the " + phrase[4:]
            queries.append(TwoHop(first, second, question, phrase))
    return queries


@dataclass
class MultiHopResult:
    queries: list[TwoHop]
    """The chains of the set."""
    kept: list[TwoHop]
    """The chains whose two single hops the model answers: the ones scored."""
    source_layers: list[int]
    target_layers: list[int]
    vanilla: list[str]
    """Generations per kept query, for the query as it is ..."""
    step_by_step: list[str]
    """... and after "Let's think step by step. "."""
    grid: torch.Tensor
    """(kept, source layers, target layers): the CoT patchscope found the answer at (ℓ, ℓ*)."""
    patched: list[list[str]]
    """[query][pair]: the CoT patchscope's generations, pairs source-major."""
    control: torch.Tensor | None = None
    """(kept, source layers, target layers): the same with another query's π1 state."""
    controls: list[TwoHop | None] | None = None
    """The query whose state each control used."""

    def solved(self) -> dict[str, torch.Tensor]:
        """Per method, (kept,) whether each query was answered."""
        answers = [q.answer for q in self.kept]
        return {"vanilla": torch.tensor([mentions(t, a) for t, a in zip(self.vanilla, answers, strict=True)]),
                "step_by_step": torch.tensor([mentions(t, a) for t, a in zip(self.step_by_step, answers, strict=True)]),
                "cot_patchscope": self.grid.flatten(1).any(-1) if len(self.kept) else torch.zeros(0, dtype=torch.bool),
                **({"control": self.control.flatten(1).any(-1) if len(self.kept) else torch.zeros(0, dtype=torch.bool)}
                   if self.control is not None else {})}

    def summary(self) -> dict:
        solved = self.solved()
        grids = {"cot_patchscope": self.grid, **({"control": self.control} if self.control is not None else {})}
        return {"chains": len(self.queries), "scored": len(self.kept),
                **{f"{method}_rate": (float(hits.float().mean()) if len(hits) else None) for method, hits in solved.items()},
                **{f"{method}_solved": int(hits.sum()) for method, hits in solved.items()},
                # the share of (query, ℓ, ℓ*) rows that give the answer: not saturated by "any pair"
                **{f"{method}_pair_share": (float(grid.float().mean()) if len(self.kept) else None)
                   for method, grid in grids.items()}}

    def heatmap(self, control: bool = False) -> torch.Tensor:
        """(source layers, target layers): the share of scored queries the pair solves (with
        another query's state if ``control``)."""
        return (self.control if control else self.grid).float().mean(0)


def control_for(queries: list[TwoHop], k: int) -> int | None:
    """The next query (cyclically) whose bridge entity and answer both differ from query k's."""
    for step in range(1, len(queries)):
        other = queries[(k + step) % len(queries)]
        if other.first.object != queries[k].first.object and other.answer != queries[k].answer:
            return (k + step) % len(queries)
    return None


def second_hop_end(tokenizer, query: TwoHop) -> int:
    """Index of π2's last token in the query, where π1's state is written; refused in one line when
    π2 ends inside a token or a word, or at the query's last token."""
    write_at = token_ending(tokenizer, query.query, len(query.question))
    if write_at is None or write_at == len(tokenizer(query.query)["input_ids"]) - 1:
        raise ConfigError(f"query {query.query!r}: the second hop's question ends inside a token; reword its template")
    return write_at


@torch.no_grad()
def multi_hop(model, facts: FactSet, source_layers: list[int] | None = None, target_layers: list[int] | None = None,
              max_new_tokens: int = 20, rows_per_pass: int = 256, control: bool = True, on_query=None) -> MultiHopResult:
    """Run the three methods (and the control, if ``control``) on every chain of ``facts`` whose
    single hops ``model`` answers; layers are residual indices (default: 0 … L − 1).
    ``on_query(i, n)`` is called after each query's sweep."""
    source_layers = list(model.layers if source_layers is None else source_layers)
    target_layers = list(model.layers if target_layers is None else target_layers)
    queries = two_hop_queries(facts)
    if not queries:
        raise ConfigError("the fact set has no two-hop chains (a fact whose object is another fact's subject); "
                          "add facts about the objects")
    write_at = {q.query: second_hop_end(model.tokenizer, q) for q in queries}  # before any generation
    hops = sorted({(f.relation, f.subject) for q in queries for f in (q.first, q.second)})
    answers = dict(zip(hops, greedy_continuations(model, [facts.relations[r].prompt(s) for r, s in hops], max_new_tokens),
                       strict=True))
    kept = [q for q in queries if all(mentions(answers[(f.relation, f.subject)], f.object) for f in (q.first, q.second))]
    shape = (len(kept), len(source_layers), len(target_layers))
    result = MultiHopResult(queries, kept, source_layers, target_layers, [], [], torch.zeros(shape, dtype=torch.bool), [],
                            torch.zeros(shape, dtype=torch.bool) if control else None, [] if control else None)
    if not kept:
        return result
    result.vanilla = greedy_continuations(model, [q.query for q in kept], max_new_tokens)
    result.step_by_step = greedy_continuations(model, [STEP_BY_STEP + q.query for q in kept], max_new_tokens)
    # π1's last-token state of every query: each query's own, and another's for its control
    states, _ = Patchscope(Source([q.query for q in kept], source_layers, position=-1)).read(model)
    for k, q in enumerate(kept):
        other = control_for(kept, k) if control else None
        rows = [k] if other is None else [k, other]
        scope = Patchscope(target=Target(q.query, layers=target_layers, placeholder=write_at[q.query]),
                           readout=Generate(max_new_tokens=max_new_tokens, stop=None), rows_per_pass=rows_per_pass)
        texts = scope.patch(model, states[:, rows], source_layers).texts  # [pair][row]
        result.patched.append([pair[0] for pair in texts])
        result.grid[k] = torch.tensor([mentions(pair[0], q.answer) for pair in texts]).view(shape[1:])
        if control:
            result.controls.append(None if other is None else kept[other])
            if other is not None:
                result.control[k] = torch.tensor([mentions(pair[1], q.answer) for pair in texts]).view(shape[1:])
        if on_query is not None:
            on_query(k + 1, len(kept))
    return result
