"""Linear relational embedding (Hernandez et al. 2023, "Linearity of Relation Decoding";
REFERENCE.md §A): a relation as an affine map from the subject's state to the last block's state.

For a relation (a fact set's relation, e.g. "The capital city of x"), with n training facts:

* each training fact's prompt is an ICL prompt of the *other* training facts, "The capital city of
  Japan is Tokyo", one per line, then the fact's own query "The capital city of France is";
* h is the residual at layer ℓ at the subject's last token, z the last block's output (before the
  final norm) at the query's last token;
* J = ∂z/∂h at that fact, b = z − J h; the operator is W = mean J, b = mean b, and predicts
  ẑ = β · W h + b (β multiplies W h only, as the paper's code; 2.25 for GPT-J and GPT-2 XL there);
* ẑ is decoded as the model decodes its last block (final norm, unembedding).

**Faithfulness**: on the test facts that the model answers (top-1) with all n training facts as
demonstrations, the share where the operator's top-1 token, applied to h from that same prompt, is
a non-empty prefix of the object (lower-cased and stripped, as the paper's code).

The **attribute lens** applies the same operator to the state of every layer and token of any
prompt.

Each Jacobian is one forward and one backward pass. The batch has d_model rows: row r has its own
copy of h and only its output coordinate r is summed, so the gradient of row r is the Jacobian's
row r. The prompt before the subject's last token runs once; its key/value cache is shared by
every row.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Span, find_span, token_position
from lenscope.model.patching import cache_argument
from lenscope.patchscopes.facts import Fact, FactSet, Relation


def lre_prompt(relation: Relation, demonstrations: list[Fact], subject: str, connector: str = " is") -> str:
    """The demonstrations, one per line, then the question about ``subject`` (its span in the prompt:
    ``queried(subject)``)."""
    lines = [f"{relation.prompt(f.subject)}{connector} {f.object}" for f in demonstrations]
    return "\n".join([*lines, f"{relation.prompt(subject)}{connector}"])


def queried(subject: str) -> Span:
    """The queried subject of an ``lre_prompt``: its last occurrence, as the question comes last and
    a demonstration may name the same entity (as its object)."""
    return Span(subject, occurrence=-1)


def is_nontrivial_prefix(prediction: str, target: str) -> bool:
    """The paper's test: the decoded token, lower-cased and stripped, starts the object."""
    prediction = prediction.lower().strip()
    return bool(prediction) and target.lower().strip().startswith(prediction)


@dataclass
class LinearRelation:
    """ẑ = β · W h + b at residual ``layer``, decoded by the model's own final norm and head."""

    relation: str
    layer: int
    weight: torch.Tensor
    """(d_model, d_model) mean Jacobian W."""
    bias: torch.Tensor
    """(d_model,) mean b."""
    beta: float
    facts: list[str]
    """The training subjects."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., d_model) → ẑ (..., d_model)."""
        return self.beta * (h.to(self.weight.dtype) @ self.weight.T) + self.bias

    def logits(self, model, h: torch.Tensor) -> torch.Tensor:
        return model.decode(self(h).to(model.adapter.unembedding_weight.dtype))


def jacobian_at(model, prompt: str, subject: str | Span, layer: int, rows_per_pass: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(J = ∂z/∂h (d, d), h (d,), z (d,)) for one prompt: h the residual ``layer`` at the subject's
    last token, z the last block's output at the prompt's last token."""
    ids = model.tokenize(prompt)
    at = token_position(model.tokenizer, prompt, ids[0].tolist(), subject, "subject")
    residuals = model.residuals(ids)
    h, z = residuals[layer, 0, at], residuals[-1, 0, -1]
    d = model.d_model
    rows_per_pass = rows_per_pass or d
    prefix = model.prompt_cache(ids[:, :at]) if at > 0 else None
    suffix = ids[:, at:]
    jacobian = torch.empty(d, d, dtype=torch.float32)
    for first in range(0, d, rows_per_pass):
        count = min(rows_per_pass, d - first)
        jacobian[first:first + count] = _jacobian_rows(model, suffix, prefix, ids.shape[1], layer, h, first, count)
    return jacobian, h.float(), z.float()


def _jacobian_rows(model, suffix: torch.Tensor, prefix, length: int, layer: int, h: torch.Tensor, first: int,
                   count: int) -> torch.Tensor:
    """Rows first … first + count of ∂z/∂h: a batch of ``count`` rows, row r with its own copy of h
    written at ``layer`` (position 0 of ``suffix``, after the shared ``prefix`` cache), and only
    z's coordinate first + r of row r summed."""
    blocks = model.adapter.blocks
    d = h.shape[-1]
    written = h.detach().expand(count, d).clone().requires_grad_(True)
    caught = {}

    def write(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[:, 0] = written.to(hidden.dtype)
        return hidden

    def write_output(module, args, output):
        return (write(output[0]), *output[1:]) if isinstance(output, tuple) else write(output)

    def write_input(module, args, kwargs):
        if args:
            return (write(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}

    def catch(module, args, output):
        caught["z"] = (output[0] if isinstance(output, tuple) else output)[:, -1]

    handles = [blocks[0].register_forward_pre_hook(write_input, with_kwargs=True) if layer == 0
               else blocks[layer - 1].register_forward_hook(write_output),
               blocks[-1].register_forward_hook(catch)]
    try:
        kwargs = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(count)
            kwargs = {cache_argument(model.hf): cache, "use_cache": True}
        mask = torch.ones(count, length, dtype=torch.long, device=suffix.device)
        with torch.enable_grad():
            model.hf(input_ids=suffix.expand(count, -1), attention_mask=mask, **kwargs)
            rows = torch.arange(count)
            picked = caught["z"].float()[rows, first + rows].sum()
            (gradient,) = torch.autograd.grad(picked, written)
    finally:
        for handle in handles:
            handle.remove()
    return gradient.float()


@dataclass
class LreResult:
    relation: str
    kind: str
    layer: int
    beta: float
    train: list[str]
    tested: list[str] = field(default_factory=list)
    """Test subjects the model answers with the n-shot prompt (the ones scored)."""
    correct: list[bool] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    facts: int = 0

    @property
    def faithfulness(self) -> float | None:
        return sum(self.correct) / len(self.correct) if self.correct else None


def fit_relation(model, facts: FactSet, relation: str, layer: int, n_train: int = 5, beta: float = 2.25,
                 seed: int = 0, connector: str = " is") -> tuple[LinearRelation, list[Fact]]:
    """The operator of ``relation`` at residual ``layer`` from ``n_train`` seeded facts, and the other
    facts (the test set)."""
    if not 0 <= layer < model.num_layers:
        raise ConfigError(f"layer {layer} out of range: the operator reads residual indices 0..{model.num_layers - 1}")
    if relation not in facts.relations:
        raise ConfigError(f"relation {relation!r} is not in the fact set; it has {sorted(facts.relations)}")
    pool = facts.of(relation)
    if len(pool) < n_train + 1:
        raise ConfigError(f"relation {relation!r} has {len(pool)} facts, fewer than n_train {n_train} + 1 to test on")
    spec = facts.relations[relation]
    for fact in pool:
        # Before any Jacobian: each question holds its subject as whole tokens (a connector such as
        # "is" without its space would leave only a demonstration's occurrence to be found).
        find_span(model.tokenizer, spec.prompt(fact.subject) + connector, queried(fact.subject), "subject")
    shuffled = list(pool)
    random.Random(f"{seed}/{relation}").shuffle(shuffled)
    train, test = shuffled[:n_train], shuffled[n_train:]
    jacobians, biases = [], []
    for i, fact in enumerate(train):
        others = train[:i] + train[i + 1:]
        j, h, z = jacobian_at(model, lre_prompt(spec, others, fact.subject, connector), queried(fact.subject), layer)
        jacobians.append(j)
        biases.append(z - j @ h)
    operator = LinearRelation(relation, layer, torch.stack(jacobians).mean(0), torch.stack(biases).mean(0), beta,
                              [f.subject for f in train])
    return operator, test


@torch.no_grad()
def faithfulness(model, facts: FactSet, operator: LinearRelation, test: list[Fact], connector: str = " is") -> LreResult:
    """Score ``operator`` on the test facts the model answers with the training facts as demonstrations."""
    spec = facts.relations[operator.relation]
    train = [f for f in facts.of(operator.relation) if f.subject in operator.facts]
    result = LreResult(operator.relation, spec.kind, operator.layer, operator.beta, operator.facts, facts=len(test) + len(train))
    for fact in test:
        prompt = lre_prompt(spec, train, fact.subject, connector)
        ids = model.tokenize(prompt)
        residuals = model.residuals(ids)
        own = model.tokenizer.decode([int(model.decode(residuals[-1, 0, -1]).argmax())])
        if not is_nontrivial_prefix(own, fact.object):
            continue
        at = token_position(model.tokenizer, prompt, ids[0].tolist(), queried(fact.subject), "subject")
        predicted = model.tokenizer.decode([int(operator.logits(model, residuals[operator.layer, 0, at]).argmax())])
        result.tested.append(fact.subject)
        result.predictions.append(predicted)
        result.correct.append(is_nontrivial_prefix(predicted, fact.object))
    return result


@torch.no_grad()
def attribute_lens(model, operator: LinearRelation, prompt: str, k: int = 1) -> tuple[list[str], torch.Tensor]:
    """The operator applied to every layer's state at every token of ``prompt``: (tokens, (layers,
    T, k) top-k token ids)."""
    ids = model.tokenize(prompt)
    states = model.residuals(ids)[: model.num_layers, 0]  # (L, T, d)
    top = operator.logits(model, states).topk(k, dim=-1).indices
    return [model.tokenizer.decode([i]) for i in ids[0].tolist()], top
