"""What each section of the Patchscopes tutorial computes, without Streamlit: every function takes
the frozen model and the page's inputs and returns tables and figures, so the app stays a thin page
and the logic is tested directly.

Each section puts a classic method ("original") beside the same question asked through a
patchscope (Ghandeharioun et al. 2024):

1. decoding next-token predictions: the logit lens and any trained lens, beside the token-identity
   patchscope;
2. attribute extraction: the LRE attribute lens and a linear probe, beside the attribute-extraction
   patchscope;
3. entity resolution: causal tracing and attention knockout, beside the entity-description patchscope;
4. cross-model patching: a fitted map from another model's states into this one (or, with one
   model, from one of its layers into another);
5. multi-hop reasoning: the plain answer beside the CoT patchscope.

Bad input raises ``UserError`` with one line; the page shows it as a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import (
    Generate,
    LensPatchscope,
    Patchscope,
    Source,
    Target,
    find_span,
    token_ending,
    token_position,
)
from lenscope.lenses.trajectory import Trajectory

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
DEFAULT_SUBJECT = "The Eiffel Tower"


def check_prompt(model, prompt: str, what: str = "prompt") -> torch.Tensor:
    """The prompt's token ids, or one line naming what is wrong with it."""
    if not prompt or not prompt.strip():
        raise ConfigError(f"the {what} is empty: type some text")
    ids = model.tokenize(prompt)
    if model.context_length and ids.shape[1] > model.context_length:
        raise ConfigError(f"the {what} has {ids.shape[1]} tokens, more than the model's context of "
                          f"{model.context_length}: shorten it")
    return ids


def layers_every(model, step: int) -> list[int]:
    return list(range(0, model.num_layers, max(1, step)))


# --- 1. decoding ----------------------------------------------------------------------------------------
@dataclass
class DecodingView:
    trajectory: Trajectory
    """Every panel: the originals, then their patchscope versions, then the token-identity patchscope."""
    originals: list[str]
    """Panel names of the lenses as they are (the logit lens first)."""
    patchscopes: list[str]
    """Panel names of the same lenses asked as patchscopes, in the same order (none when they were not
    asked), then token identity."""
    max_difference: dict[str, float]
    """Original → the largest difference of its top-k probabilities from its patchscope version's
    (empty when the lenses were not asked as patchscopes)."""


def decoding(model, prompt: str, lenses: list, k: int = 5, identity=None, as_patchscopes: bool = True,
             run_passes: bool = False) -> DecodingView:
    """The prediction trajectory of the logit lens and every lens given (originals), each also asked
    as a patchscope (its state mapped by the lens and written into the last block's output of the
    same prompt) unless ``as_patchscopes`` is False, and the token-identity patchscope.
    ``identity``: a token-identity lens to reuse (it keeps its prompt's prefix cache between
    prompts); ``run_passes``: run the patchscopes' forward passes (one per position) instead of
    decoding the written state directly."""
    from lenscope.lenses.lens import LogitLens
    from lenscope.lenses.token_identity import TokenIdentityLens

    check_prompt(model, prompt)
    identity = identity if identity is not None else TokenIdentityLens.for_model(model)
    originals = [LogitLens(model.layers, model.d_model), *lenses]
    scoped = [LensPatchscope(lens, decode_directly=not run_passes) for lens in originals] if as_patchscopes else []
    trajectory = Trajectory.of(model, prompt, [*originals, *scoped, identity], k)
    count = len(originals)
    names = [panel.name for panel in trajectory.panels]
    difference = {
        original.name: float((original.top_probs - scope.top_probs).abs().max())
        if bool((original.top_ids == scope.top_ids).all()) else float("inf")
        for original, scope in zip(trajectory.panels[:count], trajectory.panels[count:-1], strict=True)} if scoped else {}
    return DecodingView(trajectory, names[:count], names[count:], difference)


# --- 2. attribute extraction ----------------------------------------------------------------------------
@dataclass
class AttributeView:
    layers: list[int]
    lre: list[str]
    """Top token of the LRE operator applied to the subject's state at each layer."""
    probe: list[str | None]
    """The probe's object for the subject at each layer (trained on the relation's other facts)."""
    patchscope: list[str]
    """The attribute-extraction patchscope's continuation from the subject's state at each layer."""
    lre_layer: int
    answer: str | None
    """The object the fact set gives, if the subject is one of its facts."""
    probe_facts: int = 0
    """Facts the probe was trained on: the relation's others whose subject the tokenizer holds as
    whole tokens in their sentence (``find_span``)."""


def attribute(model, facts, relation: str, sentence: str, subject: str, operator=None, layer_step: int = 3,
              max_new_tokens: int = 10) -> AttributeView:
    from lenscope.patchscopes.facts import PLACEHOLDER
    from lenscope.patchscopes.probe import fit_probes

    if relation not in facts.relations:
        raise ConfigError(f"relation {relation!r} is unknown: choose one of {sorted(facts.relations)}")
    ids = check_prompt(model, sentence, "sentence")
    if not subject.strip() or subject not in sentence:
        raise ConfigError(f"the subject {subject!r} is not in the sentence: name a span of it")
    at = token_position(model.tokenizer, sentence, ids[0].tolist(), subject, "subject")
    layers = layers_every(model, layer_step)
    states = model.residuals(ids)[:, 0, at]  # (L + 1, d)
    spec = facts.relations[relation]
    lre = []
    if operator is not None:
        lre = [model.tokenizer.decode([int(operator.logits(model, states[layer]).argmax())]) for layer in layers]
    # The probe: one class per object, trained on the relation's other facts' source sentences.
    others = [f for f in facts.of(relation) if f.subject != subject and _holds_whole(model.tokenizer, f.source, f.subject)]
    objects = sorted({f.object for f in others})
    probe: list[str | None] = [None] * len(layers)
    if len(others) >= 2 and len(objects) >= 2:
        token_lists = [model.tokenizer(f.source)["input_ids"] for f in others]
        positions = [token_position(model.tokenizer, f.source, t, f.subject, "subject") for f, t in zip(others, token_lists, strict=True)]
        reads = model.residuals_of(token_lists)
        x = torch.stack([reads[layers, i, p] for i, p in enumerate(positions)], 1)  # (layers, N, d)
        y = torch.tensor([objects.index(f.object) for f in others])
        weight, bias, mean, std = fit_probes(x, y, len(objects))
        z = (states[layers].double()[:, None] - mean) / std
        predicted = torch.baddbmm(bias.unsqueeze(1), z, weight).argmax(-1)[:, 0]
        probe = [objects[int(c)] for c in predicted]
    scope = Patchscope(Source([sentence], layers, position=subject), Target(spec.template, layers="same", placeholder=PLACEHOLDER),
                       readout=Generate(max_new_tokens=max_new_tokens, stop="\n"))
    texts = [pair[0] for pair in scope.run(model).texts]
    known = next((f.object for f in facts.of(relation) if f.subject == subject), None)
    return AttributeView(layers, lre, probe, texts, operator.layer if operator is not None else -1, known, len(others))


def _holds_whole(tokenizer, text: str, span: str) -> bool:
    """Whether ``span`` is whole tokens of ``text`` (once): a tokenizer that keeps "Canada," as one
    token has no state of "Canada" alone to train the probe on."""
    try:
        find_span(tokenizer, text, span)
    except ConfigError:
        return False
    return True


# --- 3. entity resolution -------------------------------------------------------------------------------
def entity_description(model, subject: str, layer_step: int = 3, max_new_tokens: int = 20) -> tuple[list[int], list[str]]:
    """The entity-description patchscope: the subject's own last-token state at each layer, written
    into the shipped few-shot description prompt."""
    from lenscope.patchscopes.entity_description import load_entities
    from lenscope.patchscopes.facts import PLACEHOLDER

    check_prompt(model, subject, "subject")
    entities = load_entities()
    layers = layers_every(model, layer_step)
    scope = Patchscope(Source([subject], layers, position=-1), Target(entities.prompt(), layers="same", placeholder=PLACEHOLDER),
                       readout=Generate(max_new_tokens=max_new_tokens, stop=","))
    return layers, [pair[0].strip() for pair in scope.run(model).texts]


def causal_trace(model, prompt: str, subject: str, samples: int = 3, layer_step: int = 3):
    from lenscope.patchscopes.causal_tracing import causal_trace as trace

    check_prompt(model, prompt)
    return trace(model, prompt, subject, samples=samples, layers=layers_every(model, layer_step))


def knockout(model, prompt: str, subject: str, window: int = 9):
    from lenscope.patchscopes.attention_knockout import attention_knockout

    check_prompt(model, prompt)
    return attention_knockout(model, prompt, subject, window)


# --- 4. cross-model -------------------------------------------------------------------------------------
DEMO_MAP_DOCUMENTS = 16


def load_cross_model_map(path: str):
    """A map written by ``lenscope patchscope crossmodel`` (its map.safetensors)."""
    from lenscope.patchscopes.cross_model import CrossModelMap

    if not Path(path).is_file():
        raise ConfigError(f"no cross-model map at {path!r}: fit one with `lenscope patchscope crossmodel "
                          "--config configs/patchscopes/cross_model.yaml` and give its map.safetensors, or leave "
                          "the field empty to fit one of this model onto itself")
    return CrossModelMap.load(path)


def self_map(model, layer_step: int = 3, documents: int = DEMO_MAP_DOCUMENTS, max_tokens: int = 256,
             texts: list[str] | None = None):
    """Affine maps from every ``layer_step``-th residual of ``model`` to every other, fitted by least
    squares on ``texts`` (default: the first ``documents`` of the embedded demo text, the
    interpreter's help topics), every position: the within-model version of cross-model
    patching, for a machine with one model."""
    from lenscope.datamodules.sources import demo_documents
    from lenscope.patchscopes.cross_model import aligned_documents, fit_cross_model_map

    texts = list(enumerate(texts if texts is not None else demo_documents()[:documents]))
    layers = layers_every(model, layer_step)
    return fit_cross_model_map(model, model, aligned_documents(model, model, texts, max_tokens), layers, layers)


def cross_model(source, target, fitted, subject: str, target_layer: int | None = None,
                max_new_tokens: int = 20) -> tuple[list[tuple[int, int]], list[str]]:
    """The entity-description patchscope across models: the subject's last-token state in ``source``
    at each mapped layer ℓ, mapped by ``fitted`` and written into ``target``'s description prompt at
    ℓ* (``target_layer``, or ℓ itself when None)."""
    from lenscope.patchscopes.entity_description import load_entities
    from lenscope.patchscopes.facts import PLACEHOLDER

    check_prompt(source, subject, "subject")
    fitted.check(source, target)
    if target_layer is None:
        layers = [layer for layer in fitted.source_layers if layer in fitted.target_layers]
        written = "same"
    else:
        if target_layer not in fitted.target_layers:
            raise ConfigError(f"the map writes into target layers {fitted.target_layers}, not {target_layer}: choose one of them")
        layers, written = fitted.source_layers, [target_layer]
    if not layers:
        raise ConfigError("the map has no source layer that is also a target layer: choose a target layer")
    scope = Patchscope(Source([subject], layers, position=-1), Target(load_entities().prompt(), layers=written,
                                                                      placeholder=PLACEHOLDER),
                       mapping=fitted, readout=Generate(max_new_tokens=max_new_tokens, stop=","))
    result = scope.run(source, target)
    return result.pairs, [pair[0].strip() for pair in result.texts]


# --- 5. multi-hop ---------------------------------------------------------------------------------------
@dataclass
class MultiHopView:
    query: str
    vanilla: str
    layers: list[int]
    patched: list[str]
    """The CoT patchscope's continuation per layer (ℓ* = ℓ)."""


def multi_hop(model, question: str, phrase: str, layer_step: int = 3, max_new_tokens: int = 12) -> MultiHopView:
    """"The capital city of" + "the country of the city of Toronto": the query answered as it is,
    and with π1's last state at layer ℓ written over π2's last token at the same layer."""
    from lenscope.patchscopes.attribute_extraction import greedy_continuations

    for text, what in ((question, "question (π2)"), (phrase, "phrase (π1)")):
        check_prompt(model, text, what)
    query = f"{question.strip()} {phrase.strip()}"
    ids = check_prompt(model, query, "query")
    write_at = token_ending(model.tokenizer, query, len(question.strip()))
    if write_at is None or write_at == ids.shape[1] - 1:
        raise ConfigError("the question's last token must end before the phrase: reword the question")
    layers = layers_every(model, layer_step)
    vanilla = greedy_continuations(model, [query], max_new_tokens)[0]
    states, _ = Patchscope(Source([query], layers, position=-1)).read(model)
    scope = Patchscope(target=Target(query, layers="same", placeholder=write_at),
                       readout=Generate(max_new_tokens=max_new_tokens, stop=None))
    texts = scope.patch(model, states, layers).texts
    return MultiHopView(query, vanilla, layers, [pair[0] for pair in texts])
