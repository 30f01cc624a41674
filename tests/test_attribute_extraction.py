"""Attribute extraction (Patchscopes §4.2), its probe baseline, and the shipped fact set."""

from __future__ import annotations

import json

import pytest
import torch

import lenscope
from lenscope.errors import ConfigError
from lenscope.patchscopes.attribute_extraction import (
    attribute_extraction,
    greedy_continuations,
    mentions,
)
from lenscope.patchscopes.facts import FactSet, load_facts
from lenscope.patchscopes.probe import probe_accuracy


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def test_the_shipped_fact_set_is_what_the_issue_asks_for():
    facts = load_facts()
    kinds = {r.kind for r in facts.relations.values()}
    assert len(facts.relations) >= 8 and kinds == {"factual", "commonsense"} and len(facts.facts) >= 300
    for relation in facts.relations.values():
        pool = facts.of(relation.name)
        assert pool, relation.name
        assert len({f.subject for f in pool}) == len(pool), f"{relation.name}: a subject twice"
        for f in pool:
            assert f.subject in f.source and f.object.lower() not in f.source.lower(), f  # read the subject, not the answer


def tiny_facts(model, tmp_path, subjects=("w5", "w6", "w7", "w8")) -> FactSet:
    """Facts the tiny random model 'knows': each object is the first word it generates after the
    template with the subject, so the unpatched model answers every one."""
    template = "w10 w11 w12 x"
    prompts = [template[:-1] + s for s in subjects]
    first = [text.split()[0] for text in greedy_continuations(model, prompts, 3)]
    spec = {"relations": {"tiny": {"kind": "factual", "template": template},
                          "other": {"kind": "commonsense", "template": "w30 x"}},
            "facts": [{"relation": "tiny", "subject": s, "object": o, "source": f"w10 w11 w12 {s}"}
                      for s, o in zip(subjects, first, strict=True)]
            + [{"relation": "other", "subject": "w9", "object": "w199", "source": "w1 w9 w2"}]}
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(spec))
    return load_facts(path)


def test_a_state_written_back_where_it_came_from_extracts_every_answered_fact(model, tmp_path):
    facts = tiny_facts(model, tmp_path)
    layers = [0, 1, 2]
    [tiny, other] = attribute_extraction(model, facts, source_layers=layers, target_layers=layers, max_new_tokens=3)
    assert len(tiny.answered) == 4 and tiny.heatmap.shape == (3, 3)
    # The source sentence is the question itself: on the diagonal the patched run IS the question.
    assert torch.equal(tiny.heatmap.diagonal(), torch.ones(3))
    assert torch.equal(tiny.patchscope, torch.ones(3))
    assert ((tiny.heatmap >= 0) & (tiny.heatmap <= 1)).all()
    assert tiny.probe is not None and tiny.probe.shape == (3,)
    # A fact the model does not answer is not scored.
    assert other.answered == [] and other.heatmap is None
    summary = tiny.summary()
    assert summary["answered"] == 4 and summary["patchscope_mean"] == 1.0 and summary["facts"] == 4


def test_the_probe_learns_separable_classes_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(15)  # 60 examples, 4 classes
    centres = torch.randn(4, 16, generator=g) * 3
    separable = centres[y] + torch.randn(60, 16, generator=g) * 0.3
    noise = torch.randn(60, 16, generator=g)
    accuracy = probe_accuracy(torch.stack([separable, noise]), y, folds=5)
    assert accuracy[0] > 0.95 and accuracy[1] < 0.6


def test_success_ignores_spaces_and_keeps_case():
    assert mentions(" the yen.", "yen") and mentions("New York", "NewYork") and not mentions("the Yen", "yen")


@pytest.mark.parametrize(("content", "expected"), [
    ("not json", "is not valid JSON"),
    ('{"relations": {}}', "needs a 'relations' object and a 'facts' list"),
    ('{"relations": {"r": {"template": "no placeholder"}}, "facts": []}', "needs a 'template' ending in ' x'"),
    ('{"relations": {"r": {"template": "a x"}}, "facts": [{"relation": "r", "subject": "s"}]}', "fact 0 lacks object, source"),
    ('{"relations": {"r": {"template": "a x"}}, "facts": [{"relation": "q", "subject": "s", "object": "o", "source": "s."}]}',
     "relation 'q', which is not among"),
    ('{"relations": {"r": {"template": "a x"}}, "facts": [{"relation": "r", "subject": "s", "object": "o", "source": "t."}]}',
     "does not mention its subject"),
    ('{"relations": {"r": {"template": "a x"}}, "facts": []}', "has no facts"),
])
def test_a_malformed_fact_set_is_one_line(tmp_path, content, expected):
    path = tmp_path / "facts.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected) as info:
        load_facts(path)
    assert "\n" not in str(info.value)


def test_lenscope_patchscope_attribute_writes_the_table_and_heatmaps(model, tiny_model_dir, tmp_path, capsys):
    from lenscope import cli

    facts = tiny_facts(model, tmp_path)
    out = tmp_path / "out"
    cli.main(["patchscope", "attribute", "--model", str(tiny_model_dir), "--facts", str(tmp_path / "facts.json"),
              "--source_layers", "[0, 2]", "--max_new_tokens", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| tiny | factual | 4 | 4 |" in printed and "| other | commonsense | 1 | 0 |" in printed
    results = json.loads((out / "results.json").read_text())
    tiny = results["relations"][0]
    assert tiny["heatmap"] == [[1.0, tiny["heatmap"][0][1]], [tiny["heatmap"][1][0], 1.0]]  # the diagonal: see above
    assert (out / "heatmap_tiny.png").read_bytes()[:4] == b"\x89PNG" and not (out / "heatmap_other.png").exists()
    assert len(facts.facts) == 5 and (out / "table.csv").read_text().startswith("relation,kind,facts,answered")


def test_lenscope_patchscope_run_from_yaml(tiny_model_dir, tmp_path, capsys):
    from lenscope import cli

    config = tmp_path / "scope.yaml"
    config.write_text(f"model: {tiny_model_dir}\nsource:\n  prompts: ['w1 w2 w3']\n  layers: [1, 2]\n  position: w2\n"
                      "target:\n  prompt: 'w7 w8 x'\n  placeholder: x\ngenerate: 2\nstop: null\n"
                      f"out: {tmp_path / 'scope.json'}\n")
    cli.main(["patchscope", "run", "--config", str(config)])
    rows = json.loads((tmp_path / "scope.json").read_text())["rows"]
    assert [(r["source_layer"], r["target_layer"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(isinstance(r["generation"], str) for r in rows)


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "--source.layers", "[1]"], "source.prompts"),
    (["attribute", "--layer_step", "0"], "--layer_step must be at least 1"),
    (["attribute", "--relations", "[nope]"], "--relations has ['nope'], which the fact set lacks"),
])
def test_lenscope_patchscope_bad_options_are_one_line(tiny_model_dir, capsys, argv, expected):
    from lenscope import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["patchscope", *argv, "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_the_experiments_log_to_wandb(model, tiny_model_dir, tmp_path, wandb_spy):
    from lenscope import cli

    tiny_facts(model, tmp_path)
    cli.main(["patchscope", "attribute", "--model", str(tiny_model_dir), "--facts", str(tmp_path / "facts.json"),
              "--source_layers", "[0, 2]", "--max_new_tokens", "3", "--out", str(tmp_path / "ae"),
              "--wandb_project", "lenscope-test"])
    entities = tmp_path / "entities.json"
    entities.write_text(json.dumps({"few_shot": [["w1", "w2"]], "entities": [{"name": "w5", "description": "w6", "split": "rare"}]}))
    cli.main(["patchscope", "describe", "--model", str(tiny_model_dir), "--entities", str(entities), "--layers", "[1]",
              "--max_new_tokens", "2", "--out", str(tmp_path / "ed"), "--wandb_project", "lenscope-test"])
    assert [i["project"] for i in wandb_spy.inits] == ["lenscope-test", "lenscope-test"]
    assert [i["job_type"] for i in wandb_spy.inits] == ["attribute-extraction", "entity-description"]
    logged = {key for data in wandb_spy.logged for key in data}
    assert {"attribute_extraction/table", "attribute_extraction/heatmap/tiny", "entity_description/rouge_l",
            "entity_description/generations"} <= logged
    assert wandb_spy.runs[0].summary["attribute_extraction/tiny/patchscope_mean"] == 1.0
