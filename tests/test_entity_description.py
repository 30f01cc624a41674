"""Entity description (Patchscopes §4.3) on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

import lenscope
from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Generate, Patchscope, Source, Target
from lenscope.patchscopes.entity_description import entity_description, load_entities, rouge_l


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def write_set(path, entities, few_shot=(("w1", "w2 w3"), ("w4", "w5 w6"))):
    path.write_text(json.dumps({"few_shot": [list(p) for p in few_shot], "entities": entities}))
    return path


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    assert rouge_l(["capital city of France"], ["capital city of France"]) == [1.0]
    assert rouge_l(["capital city of France"], ["a river"]) == [0.0]
    assert rouge_l(["capital city of France"], ["the capital of France"])[0] == pytest.approx(0.75)


def test_a_reference_equal_to_the_generation_scores_one_and_splits_average(model, tmp_path):
    names = ["w10", "w11", "w12", "w13"]
    base = write_set(tmp_path / "e.json", [{"name": n, "description": "w99", "split": "rare"} for n in names])
    entities = load_entities(base)
    assert entities.prompt() == "w1: w2 w3, w4: w5 w6, x"
    # What the model says of each name at layer 2: used as the reference, it must score 1 there.
    said = Patchscope(Source(names, [2], position=-1), Target(entities.prompt(), placeholder="x"),
                      readout=Generate(max_new_tokens=4, stop=None)).run(model).texts[0]
    assert all(s.strip() for s in said)
    split = ["well-known", "well-known", "rare", "rare"]
    again = load_entities(write_set(tmp_path / "f.json", [{"name": n, "description": s.strip(), "split": p}
                                                          for n, s, p in zip(names, said, split, strict=True)]))
    result = entity_description(model, again, layers=[1, 2], max_new_tokens=4, stop=None)
    assert result.rouge.shape == (2, 4) and torch.equal(result.rouge[1], torch.ones(4))
    assert set(result.splits) == {"well-known", "rare"}
    torch.testing.assert_close(result.splits["rare"], result.rouge[:, 2:].mean(-1))
    assert ((result.rouge >= 0) & (result.rouge <= 1)).all()


def test_the_shipped_entity_set_has_both_splits():
    entities = load_entities()
    splits = [e.split for e in entities.entities]
    assert splits.count("well-known") >= 50 and splits.count("rare") >= 50 and len(entities.few_shot) >= 3
    assert all(e.name not in e.description for e in entities.entities)


def test_lenscope_patchscope_describe_writes_the_curve(model, tiny_model_dir, tmp_path, capsys):
    from lenscope import cli

    path = write_set(tmp_path / "e.json", [{"name": "w10", "description": "w1 w2", "split": "rare"},
                                           {"name": "w20", "description": "w3", "split": "well-known"}])
    cli.main(["patchscope", "describe", "--model", str(tiny_model_dir), "--entities", str(path),
              "--layers", "[0, 3]", "--max_new_tokens", "3", "--out", str(tmp_path / "out")])
    assert "| layer | ROUGE-L rare | ROUGE-L well-known |" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["layers"] == [0, 3] and len(results["entities"][0]["generations"]) == 2
    assert (tmp_path / "out" / "rouge_l.png").read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "out" / "generations.csv").read_text().splitlines()
    assert rows[0] == "layer,entity,split,reference,generation,rouge_l" and len(rows) == 1 + 2 * 2


@pytest.mark.parametrize(("content", "expected"), [
    ('{"entities": []}', "needs a 'few_shot' list"),
    ('{"few_shot": [["a"]], "entities": []}', "is not a [name, description] pair"),
    ('{"few_shot": [], "entities": [{"name": "a"}]}', "entity 0 needs name, description and split"),
    ('{"few_shot": [], "entities": []}', "has no entities"),
])
def test_a_malformed_entity_set_is_one_line(tmp_path, content, expected):
    path = tmp_path / "e.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_entities(path)
