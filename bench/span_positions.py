"""Where each shipped prompt's spans fall: the token the old substring search (``str.rfind``) found
and the one ``find_span`` (token boundaries) finds, for every prompt of the documented experiments.

    python bench/span_positions.py [--model embedded:smollm2-135m] [--all]

Only the tokenizer is loaded. Prints one line per span whose position changed or that is now refused
(``--all``: every span), then a count per experiment. The experiments that read the last token of
each prompt (entity description's source, cross-model patching, the ICL steering tasks) find no span
and are not listed.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Span, find_span, token_ending
from lenscope.model.loading import EMBEDDED_MODEL, embedded_model_dir
from lenscope.patchscopes.entity_description import load_entities
from lenscope.patchscopes.facts import PLACEHOLDER, load_facts
from lenscope.patchscopes.lre import lre_prompt, queried
from lenscope.patchscopes.multi_hop import two_hop_queries
from lenscope.tutorial.sections import DEFAULT_PROMPT, DEFAULT_SUBJECT

ROOT = Path(__file__).resolve().parents[1]


def old_range(tokenizer, text: str, span: str) -> tuple[int, int] | None:
    """What the substring search gave: the tokens overlapping the last occurrence (causal tracing's
    range; its last token is ``token_position``'s)."""
    where = text.rfind(span)
    if not span or where < 0:
        return None
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > where and a < where + len(span) and b > a]
    return (inside[0], inside[-1] + 1) if inside else None


def old_ending(tokenizer, text: str, end: int) -> int | None:
    """The old ``token_ending``: the token holding character end − 1, wherever it ends."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return next((i for i, (a, b) in enumerate(offsets) if a < end <= b), None)


def spans(tokenizer) -> list[tuple[str, str, str | Span, str]]:
    """(experiment, prompt, span, what) for every span the documented experiments look up."""
    facts = load_facts()
    found = []
    for fact in facts.facts:
        found.append(("attribute extraction: source subject", fact.source, fact.subject, fact.relation))
    for relation in facts.relations.values():
        found.append(("attribute extraction: target placeholder", relation.template, PLACEHOLDER, relation.name))
    found.append(("entity description: target placeholder", load_entities().prompt(), PLACEHOLDER, "few-shot prompt"))
    scope = yaml.safe_load((ROOT / "configs/patchscopes/entity_in_a_sentence.yaml").read_text())
    found.append(("entity_in_a_sentence.yaml: source position", scope["source"]["prompts"][0], scope["source"]["position"], ""))
    found.append(("entity_in_a_sentence.yaml: target placeholder", scope["target"]["prompt"], scope["target"]["placeholder"], ""))
    found.append(("causal tracing / knockout: subject", DEFAULT_PROMPT, DEFAULT_SUBJECT, "the documented prompt"))
    # LRE, as `lenscope patchscope lre` builds its prompts (seed 0, n_train 5, connector " is")
    for name, relation in facts.relations.items():
        pool = list(facts.of(name))
        random.Random(f"0/{name}").shuffle(pool)
        train, test = pool[:5], pool[5:]
        for i, fact in enumerate(train):
            found.append(("LRE: fitted subject", lre_prompt(relation, train[:i] + train[i + 1:], fact.subject), queried(fact.subject), name))
        for fact in test:
            found.append(("LRE: tested subject", lre_prompt(relation, train, fact.subject), queried(fact.subject), name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--all", action="store_true", help="print every span, not only the ones that moved")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir() if args.model == EMBEDDED_MODEL else args.model)
    counts: Counter = Counter()
    for experiment, prompt, span, note in spans(tokenizer):
        text = span.text if isinstance(span, Span) else span
        before = old_range(tokenizer, prompt, text)
        try:
            after: tuple[int, int] | str = find_span(tokenizer, prompt, span)
        except ConfigError as err:
            after = f"refused: {err}"
        # token_position reads the last token; causal tracing corrupts the whole range
        same = before == after
        counts[(experiment, "same" if same else "moved" if isinstance(after, tuple) else "refused")] += 1
        if args.all or not same:
            print(f"{experiment} [{note}] {prompt!r} span {text!r}: old tokens {before}, new {after}")
    for query in two_hop_queries(load_facts()):
        before, after = old_ending(tokenizer, query.query, len(query.question)), token_ending(tokenizer, query.query, len(query.question))
        counts[("multi-hop: π2's last token", "same" if before == after else "moved")] += 1
        if args.all or before != after:
            print(f"multi-hop {query.query!r}: old token {before}, new {after}")
    print()
    for experiment in dict.fromkeys(e for e, _ in counts):
        print(f"{experiment}: " + ", ".join(f"{counts[(experiment, k)]} {k}" for k in ("same", "moved", "refused")
                                          if counts[(experiment, k)]))


if __name__ == "__main__":
    main()
