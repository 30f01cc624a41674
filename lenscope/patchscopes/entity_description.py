"""Entity description (Patchscopes §4.3): what does the state of an entity's name say about it?

The source is the bare name, read at its last token; the target is a few-shot description prompt
ending in the placeholder ("Syria: country in the Middle East, Leonardo DiCaprio: American actor,
…, x"); the state at layer ℓ is written over the placeholder at the same layer, and the model
generates (up to 50 tokens, cut at the few-shot separator ``,``). Each generation is scored with
ROUGE-L (Google's ``rouge-score``, F-measure) against a short reference description. The project
ships its own references (``lenscope/data/entities.json``, written by the project), split into
well-known and rare entities: the paper's Fig. 3 is the ROUGE-L curve over layers for each split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Generate, Patchscope, Source, Target
from lenscope.patchscopes.data import read_json

PLACEHOLDER = "x"


@dataclass(frozen=True)
class Entity:
    name: str
    description: str
    """The reference: a short encyclopedia tag line ("capital city of France")."""
    split: str
    """``well-known`` or ``rare``."""
    kind: str = ""


@dataclass(frozen=True)
class EntitySet:
    few_shot: list[tuple[str, str]]
    """(name, description) pairs of the target prompt."""
    entities: list[Entity]

    def prompt(self) -> str:
        """The target: the few-shot pairs, then the placeholder."""
        return ", ".join(f"{name}: {description}" for name, description in self.few_shot) + f", {PLACEHOLDER}"


def load_entities(path: str | Path | None = None) -> EntitySet:
    """The entity set at ``path`` (default: the one lenscope ships); malformed entries are refused
    in one line."""
    path, raw = read_json(path, "entities.json", "entity set")
    if not isinstance(raw, dict) or not isinstance(raw.get("entities"), list) or not isinstance(raw.get("few_shot"), list):
        raise ConfigError(f"entity set {path} needs a 'few_shot' list of [name, description] pairs and an 'entities' list")
    few_shot = []
    for pair in raw["few_shot"]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p.strip() for p in pair)):
            raise ConfigError(f"entity set {path}: few_shot entry {pair!r} is not a [name, description] pair of texts")
        few_shot.append((pair[0], pair[1]))
    entities = []
    for i, entry in enumerate(raw["entities"]):
        ok = isinstance(entry, dict) and all(isinstance(entry.get(k), str) and entry[k].strip()
                                             for k in ("name", "description", "split"))
        if not ok:
            raise ConfigError(f"entity set {path}: entity {i} needs name, description and split as text")
        entities.append(Entity(entry["name"], entry["description"], entry["split"], str(entry.get("kind", ""))))
    if not entities:
        raise ConfigError(f"entity set {path} has no entities")
    return EntitySet(few_shot, entities)


@dataclass
class DescriptionResult:
    layers: list[int]
    entities: list[Entity]
    generations: list[list[str]]
    """[layer][entity]."""
    rouge: torch.Tensor
    """(layers, entities) ROUGE-L F-measure of each generation against its reference."""
    splits: dict[str, torch.Tensor] = field(default_factory=dict)
    """split → (layers,) mean ROUGE-L over its entities (the paper's Fig. 3 curves)."""


def rouge_l(references: list[str], generations: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(ref, gen)["rougeL"].fmeasure for ref, gen in zip(references, generations, strict=True)]


def entity_description(model, entities: EntitySet, layers: list[int] | None = None, max_new_tokens: int = 50,
                       stop: str | None = ",", rows_per_pass: int = 256, target_model=None,
                       mapping=None) -> DescriptionResult:
    """Describe every entity from its name's state at each layer (ℓ* = ℓ). ``target_model``: patch
    into another model (cross-model description, the paper's Fig. 3 for 7B → 13B); ``mapping``
    (``f(h, ℓ, ℓ*)``, e.g. a ``CrossModelMap``) maps the states first, needed when the widths differ."""
    layers = list(model.layers if layers is None else layers)
    if mapping is not None and hasattr(mapping, "source_layers"):
        missing = [layer for layer in layers if layer not in mapping.source_layers or layer not in mapping.target_layers]
        if missing:
            raise ConfigError(f"the mapping has no map from layer {missing[0]} to itself (it covers {mapping.source_layers} → "
                              f"{mapping.target_layers}); describe at layers it maps, or fit it on these")
    scope = Patchscope(Source([e.name for e in entities.entities], layers, position=-1),
                       Target(entities.prompt(), layers="same", placeholder=PLACEHOLDER), mapping=mapping,
                       readout=Generate(max_new_tokens=max_new_tokens, stop=stop), rows_per_pass=rows_per_pass)
    result = scope.run(model, target_model)
    generations = [[text.strip() for text in per_layer] for per_layer in result.texts]
    references = [e.description for e in entities.entities]
    rouge = torch.tensor([rouge_l(references, per_layer) for per_layer in generations])
    splits = {}
    for split in sorted({e.split for e in entities.entities}):
        members = torch.tensor([e.split == split for e in entities.entities])
        splits[split] = rouge[:, members].mean(-1)
    return DescriptionResult(layers, entities.entities, generations, rouge, splits)
