"""Facts for attribute extraction: (subject, relation, object) with a source sentence per fact and a
zero-shot target template per relation.

The project ships its own set (``lenscope/data/facts.json``, written by the project, MIT like the
rest): 11 relations, factual and commonsense, 382 facts. Another file of the same shape can be
given anywhere a fact set is taken::

    {"relations": {"country_currency": {"kind": "factual", "template": "The official currency of x"}},
     "facts": [{"relation": "country_currency", "subject": "Japan", "object": "yen",
                "source": "Tokyo is the largest city in Japan by far."}]}

``template`` ends with the placeholder ``x`` (where the subject's state is written); ``source``
mentions the subject (its last token is where the state is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lenscope.errors import ConfigError
from lenscope.patchscopes.data import read_json

PLACEHOLDER = "x"


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str
    """``factual`` or ``commonsense``."""
    template: str
    """Zero-shot target prompt ending in the placeholder ``x``: "The official currency of x"."""

    def prompt(self, subject: str) -> str:
        """The template with the subject in place of the placeholder (the unpatched question)."""
        return self.template[: -len(PLACEHOLDER)] + subject


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str
    source: str
    """A sentence that mentions the subject (and not the object)."""


@dataclass(frozen=True)
class FactSet:
    relations: dict[str, Relation]
    facts: list[Fact]

    def of(self, relation: str) -> list[Fact]:
        return [f for f in self.facts if f.relation == relation]


def load_facts(path: str | Path | None = None) -> FactSet:
    """The fact set at ``path`` (default: the one lenscope ships); a malformed file is refused in
    one line naming the entry and what is wrong with it."""
    path, raw = read_json(path, "facts.json", "fact set")
    if not isinstance(raw, dict) or not isinstance(raw.get("relations"), dict) or not isinstance(raw.get("facts"), list):
        raise ConfigError(f"fact set {path} needs a 'relations' object and a 'facts' list")
    relations = {}
    for name, spec in raw["relations"].items():
        template = spec.get("template") if isinstance(spec, dict) else None
        if not isinstance(template, str) or not template.endswith(" " + PLACEHOLDER):
            raise ConfigError(f"fact set {path}: relation {name!r} needs a 'template' ending in ' {PLACEHOLDER}' "
                              f"(the placeholder the subject's state is written over), got {template!r}")
        relations[name] = Relation(name, str(spec.get("kind", "factual")), template)
    facts = []
    for i, entry in enumerate(raw["facts"]):
        fields = {k: entry.get(k) for k in ("relation", "subject", "object", "source")} if isinstance(entry, dict) else {}
        missing = [k for k in ("relation", "subject", "object", "source") if not isinstance(fields.get(k), str) or not fields[k].strip()]
        if missing:
            raise ConfigError(f"fact set {path}: fact {i} lacks {', '.join(missing)} (each fact needs relation, "
                              "subject, object and source as text)")
        if fields["relation"] not in relations:
            raise ConfigError(f"fact set {path}: fact {i} has relation {fields['relation']!r}, which is not among "
                              f"the relations {sorted(relations)}")
        if fields["subject"] not in fields["source"]:
            raise ConfigError(f"fact set {path}: fact {i}'s source sentence does not mention its subject "
                              f"{fields['subject']!r}; the subject's state is read there")
        facts.append(Fact(**fields))
    if not facts:
        raise ConfigError(f"fact set {path} has no facts")
    return FactSet(relations, facts)
