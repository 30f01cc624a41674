"""Multi-hop queries and the CoT patchscope (Patchscopes §5) on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch

import lenscope
from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import Generate, Patchscope, Source, Target
from lenscope.patchscopes.attribute_extraction import greedy_continuations, mentions
from lenscope.patchscopes.facts import load_facts
from lenscope.patchscopes.multi_hop import STEP_BY_STEP, multi_hop, two_hop_queries


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def write_facts(tmp_path, relations: dict, facts: list[dict]):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"relations": relations, "facts": facts}))
    return load_facts(path)


def chained_facts(model, tmp_path):
    """Two relations the tiny model 'knows' (each object is the first word it generates), chained:
    the objects of the first are the subjects of the second. One more chain has a wrong second
    answer, so its hop is not answered and the query is not scored."""
    first, second = "w10 w11 x", "w30 w31 x"
    candidates = [f"w{k}" for k in range(40, 80)]
    bridges = [g.split()[0] for g in greedy_continuations(model, [f"w10 w11 {s}" for s in candidates], 3)]
    answers = [g.split()[0] for g in greedy_continuations(model, [f"w30 w31 {b}" for b in bridges], 3)]
    # three chains with different bridges and different answers (so each has a control)
    chosen = []
    for k in range(len(candidates)):
        if all(bridges[k] != bridges[j] and answers[k] != answers[j] for j in chosen) and bridges[k] not in candidates:
            chosen.append(k)
    assert len(chosen) >= 3, "the tiny model generates too few distinct words"
    subjects = [candidates[k] for k in chosen[:3]]
    bridges, answers = [bridges[k] for k in chosen[:3]], [answers[k] for k in chosen[:3]]
    relations = {"one": {"kind": "factual", "template": first}, "two": {"kind": "factual", "template": second}}
    facts = [{"relation": "one", "subject": s, "object": b, "source": f"w1 {s}"} for s, b in zip(subjects, bridges, strict=True)]
    facts += [{"relation": "two", "subject": b, "object": a, "source": f"w2 {b}"}
              for b, a in dict(zip(bridges, answers, strict=True)).items()]
    facts += [{"relation": "one", "subject": "w8", "object": "w150", "source": "w1 w8"},
              {"relation": "two", "subject": "w150", "object": "w199", "source": "w2 w150"}]
    return write_facts(tmp_path, relations, facts)


def test_chains_are_built_from_facts_whose_object_is_another_facts_subject():
    facts = load_facts()
    queries = two_hop_queries(facts)
    assert len(queries) >= 40
    for q in queries:
        assert q.first.object == q.second.subject and q.first.relation != q.second.relation
        assert q.query.endswith(q.first.subject) and q.query.startswith(q.question)
    toronto = next(q for q in queries if q.first.subject == "Toronto" and q.second.relation == "country_capital")
    assert toronto.query == "The capital city of the country of the city of Toronto" and toronto.answer == "Ottawa"


def test_the_three_methods_on_the_queries_whose_hops_are_answered(model, tmp_path):
    facts = chained_facts(model, tmp_path)
    layers = [0, 2, 3]
    result = multi_hop(model, facts, source_layers=layers, target_layers=[1, 3], max_new_tokens=4)
    assert len(result.queries) == 4 and len(result.kept) == 3 and "w8" not in [q.first.subject for q in result.kept]
    assert result.grid.shape == (3, 3, 2) and len(result.patched[0]) == 6
    # vanilla and "step by step" are the plain model's continuations of the query
    queries = [q.query for q in result.kept]
    assert result.vanilla == greedy_continuations(model, queries, 4)
    assert result.step_by_step == greedy_continuations(model, [STEP_BY_STEP + q for q in queries], 4)
    # the CoT patchscope of one pair, by hand: the query's last state at ℓ = 2 written over π2's last
    # token ("w31", index 1) at ℓ* = 3, then greedy steps, each a whole patched pass read at the end
    q = result.kept[0]
    ids = model.tokenize(q.query)
    h = model.residuals(ids)[2, 0, -1]
    generated = []
    for _ in range(4):
        at, last = torch.tensor([1]), torch.tensor([ids.shape[1] - 1])
        token = int(model.engine.run(ids, None, torch.tensor([3]), at, h[None], last)[0].argmax())
        generated.append(token)
        if token == model.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    expected = model.tokenizer.decode([t for t in generated if t != model.tokenizer.eos_token_id])
    pair = [(s, t) for s in layers for t in [1, 3]].index((2, 3))
    assert result.patched[0][pair] == expected
    assert bool(result.grid[0].flatten()[pair]) == mentions(expected, q.answer)
    solved = result.solved()
    assert torch.equal(solved["cot_patchscope"], result.grid.flatten(1).any(-1))
    summary = result.summary()
    assert summary["scored"] == 3 and summary["cot_patchscope_solved"] == int(solved["cot_patchscope"].sum())
    # the control: another query's π1 state, written the same way into this query
    other = result.controls[0]
    assert other.first.object != q.first.object and other.answer != q.answer
    reference = Patchscope(Source([other.query], layers, position=-1), Target(q.query, layers=[1, 3], placeholder=1),
                           readout=Generate(max_new_tokens=4, stop=None)).run(model)
    assert torch.equal(result.control[0].flatten(), torch.tensor([mentions(t[0], q.answer) for t in reference.texts]))
    assert summary["control_solved"] == int(result.control.flatten(1).any(-1).sum())


def test_a_fact_set_without_chains_is_one_line(model, tmp_path):
    facts = write_facts(tmp_path, {"one": {"template": "w10 x"}},
                        [{"relation": "one", "subject": "w5", "object": "w6", "source": "w1 w5"}])
    with pytest.raises(ConfigError, match="no two-hop chains"):
        multi_hop(model, facts, [0], [0])


def test_lenscope_patchscope_multihop_writes_rates_and_heatmap(model, tiny_model_dir, tmp_path, capsys, wandb_spy):
    from lenscope import cli

    chained_facts(model, tmp_path)
    out = tmp_path / "out"
    cli.main(["patchscope", "multihop", "--model", str(tiny_model_dir), "--facts", str(tmp_path / "facts.json"),
              "--source_layers", "[0, 3]", "--max_new_tokens", "3", "--out", str(out), "--wandb_project", "lenscope-test"])
    printed = capsys.readouterr().out
    assert [i["job_type"] for i in wandb_spy.inits] == ["multi-hop"]
    assert {"multi_hop/rates", "multi_hop/heatmap"} <= {key for data in wandb_spy.logged for key in data}
    assert wandb_spy.runs[0].summary["multi_hop/scored"] == 3
    assert "4 two-hop chains in the fact set; **3** have both single hops answered" in printed
    assert "| control: another query's π1 state (any (ℓ, ℓ*)) |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["scored"] == 3 and len(results["heatmap"]) == 2 and len(results["queries"]) == 3
    assert all(q["control_query"] not in (None, q["query"]) for q in results["queries"])
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in ("heatmap.png", "heatmap_minus_control.png"))
    assert results["cot_patchscope_pair_share"] == pytest.approx(
        sum(len(q["cot_patchscope_pairs"]) for q in results["queries"]) / (3 * 2 * 2))
    assert len((out / "queries.csv").read_text().splitlines()) == 4
