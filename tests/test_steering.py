"""In-context tasks, h-vectors and function vectors: the prompts, the batched indirect-effect sweep
against one plain pass per head, the vectors against their definitions, and ``lenscope steer``."""

from __future__ import annotations

import json

import pytest
import torch

from lenscope.errors import ConfigError
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import LoadedModel
from lenscope.steering.tasks import build_prompts, load_task, shipped_tasks
from lenscope.steering.vectors import (
    encode,
    function_vector,
    indirect_effects,
    last_token_logits,
    mean_last_states,
    steer_task,
    top_heads,
)
from lenscope.training.preflight import LOCK_NAME
from tests.conftest import make_tokenizer, tiny_llama
from tests.test_adapter import build


def word_task(tmp_path, n: int = 40, name: str = "next_word") -> str:
    """A task in the tiny tokenizer's words: w{i} → w{i + 50}."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "pairs": [[f"w{i}", f"w{i + 50}"] for i in range(10, 10 + n)]}))
    return str(path)


@pytest.fixture(scope="module")
def model():
    return FrozenModel(LoadedModel(tiny_llama(), make_tokenizer(), "tiny", "local"))


def test_the_shipped_tasks_are_there_and_big_enough():
    assert {"antonyms", "country_capital", "present_past"} <= set(shipped_tasks())
    sizes = {name: len(load_task(name).pairs) for name in shipped_tasks()}
    assert sizes["antonyms"] >= 100 and all(size >= 50 for size in sizes.values())
    for name in shipped_tasks():
        pairs = load_task(name).pairs
        assert len(set(pairs)) == len(pairs), f"{name} repeats a pair"


def test_prompts_are_seeded_and_keep_the_test_queries_apart(tmp_path):
    task = load_task(word_task(tmp_path))
    a, b = build_prompts(task, n_shots=4, n_prompts=6, seed=3), build_prompts(task, n_shots=4, n_prompts=6, seed=3)
    assert [p.text for p in a.clean] == [p.text for p in b.clean] and [p.text for p in a.icl] == [p.text for p in b.icl]
    assert [p.text for p in build_prompts(task, n_shots=4, n_prompts=6, seed=4).clean] != [p.text for p in a.clean]
    more = build_prompts(task, n_shots=4, n_prompts=9, seed=3)  # more clean prompts: the test prompts stay
    assert [p.text for p in more.icl] == [p.text for p in a.icl] and more.clean[:6] == a.clean
    test_inputs = {p.query for p in a.zero_shot}
    assert len(test_inputs) == round(0.3 * 40)
    assert a.zero_shot[0].text == f"Q: {a.zero_shot[0].query}\nA:"
    for clean, shuffled in zip(a.clean, a.shuffled, strict=True):
        assert clean.query not in test_inputs and clean.text.endswith(f"Q: {clean.query}\nA:")
        assert clean.text.count("Q: ") == 5 and not any(f"Q: {x}\n" in clean.text for x in test_inputs)
        lines = clean.text.split("\n\n")[:-1]
        shuffled_lines = shuffled.text.split("\n\n")[:-1]
        assert [line.split("\n")[0] for line in lines] == [line.split("\n")[0] for line in shuffled_lines]
        assert sorted(line.split("\n")[1] for line in lines) == sorted(line.split("\n")[1] for line in shuffled_lines)
        assert shuffled.answer == clean.answer and shuffled.query == clean.query
    for p in a.icl:
        assert p.text.endswith(f"Q: {p.query}\nA:") and p.text.count("Q: ") == 5 and p.query in test_inputs


@pytest.mark.parametrize(("content", "match"), [
    ({"pairs": []}, "has no pairs"),
    ({"pairs": [["hot", "cold"], ["up"]]}, "pair 1 is \\['up'\\]; each pair must be \\[input, output\\]"),
    ({"pairs": [["hot", ""]]}, "pair 0"),
    ({"name": "x"}, "needs a 'pairs' list"),
])
def test_a_malformed_task_file_is_one_line(tmp_path, content, match):
    path = tmp_path / "task.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=match) as err:
        load_task(str(path))
    assert "\n" not in str(err.value)


def test_too_few_pairs_and_an_unknown_task_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="fewer than --n_shots 10 \\+ 1 query"):
        build_prompts(load_task(word_task(tmp_path, n=12)), n_shots=10)
    with pytest.raises(ConfigError, match="no task 'antonym': give a shipped task \\(antonyms"):
        load_task("antonym")


def test_an_added_vector_is_the_one_a_torch_hook_adds(model, tmp_path):
    prompts = build_prompts(load_task(word_task(tmp_path)), n_shots=3, n_prompts=2)
    tokens, _ = encode(model, prompts.zero_shot[:5])
    vectors = {j: torch.randn(model.d_model, generator=torch.Generator().manual_seed(j)) for j in (0, 2, 3)}
    got = last_token_logits(model, tokens, [None, 0, 2, 3], vectors, rows_per_pass=7)
    blocks = model.adapter.blocks
    for j, layer in enumerate([None, 0, 2, 3]):
        for n, ids in enumerate(tokens):
            last = len(ids) - 1

            def add_output(module, args, output, layer=layer, last=last):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden[:, last] += vectors[layer]

            def add_input(module, args, layer=layer, last=last):
                args[0][:, last] += vectors[layer]

            handle = None
            if layer == 0:
                handle = blocks[0].register_forward_pre_hook(add_input)
            elif layer is not None:
                handle = blocks[layer - 1].register_forward_hook(add_output)
            try:
                with torch.no_grad():
                    expected = model.hf(input_ids=torch.tensor([ids])).logits[0, -1]
            finally:
                if handle:
                    handle.remove()
            torch.testing.assert_close(got[j, n], expected, atol=1e-4, rtol=1e-4)
    assert (got[1:] - got[:1]).abs().amax() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_the_batched_indirect_effects_equal_one_plain_pass_per_head(arch, tmp_path):
    tokenizer = make_tokenizer()
    tiny = FrozenModel(LoadedModel(build(arch), tokenizer, arch, "local"))
    task = load_task(word_task(tmp_path))
    prompts = build_prompts(task, n_shots=3, n_prompts=3, seed=1)
    clean, _ = encode(tiny, prompts.clean)
    shuffled, answers = encode(tiny, prompts.shuffled)
    _, mean_heads = mean_last_states(tiny, clean, batch_size=2)
    heads = tiny.heads
    shared = indirect_effects(tiny, shuffled, answers, mean_heads, rows_per_pass=5)
    full = indirect_effects(tiny, shuffled, answers, mean_heads, rows_per_pass=5, share_prefix=False)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-4)
    # The definition, one head at a time, with a plain torch pre-hook on the output projection.
    expected = torch.zeros_like(shared)
    for i, layer in enumerate(heads.layers):
        for h in range(heads.num_heads):
            for ids, answer in zip(shuffled, answers.tolist(), strict=True):
                x = torch.tensor([ids])

                def write(module, args, h=h, i=i):
                    z = args[0].clone()
                    z[:, -1, h * heads.head_dim:(h + 1) * heads.head_dim] = mean_heads[i, h]
                    return (z, *args[1:])

                with torch.no_grad():
                    p0 = torch.softmax(tiny.hf(input_ids=x).logits[0, -1], -1)[answer]
                    handle = heads.projection(tiny.hf, layer).register_forward_pre_hook(write)
                    try:
                        p1 = torch.softmax(tiny.hf(input_ids=x).logits[0, -1], -1)[answer]
                    finally:
                        handle.remove()
                expected[i, h] += (p1 - p0) / len(shuffled)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-4)
    assert shared.abs().max() > 0


def test_the_function_vector_is_the_top_heads_means_through_the_projection(model, tmp_path):
    prompts = build_prompts(load_task(word_task(tmp_path)), n_shots=3, n_prompts=4)
    clean, _ = encode(model, prompts.clean)
    mean_residual, mean_heads = mean_last_states(model, clean, batch_size=3)
    # The means against one prompt at a time.
    states = [model.residuals(torch.tensor([ids]))[:, 0, -1] for ids in clean]
    torch.testing.assert_close(mean_residual, torch.stack(states).mean(0), atol=1e-5, rtol=1e-5)
    aie = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # block 2, head 3 is the best
    chosen = top_heads(aie, model.heads.layers, 3)
    assert chosen == [(2, 3), (2, 2), (2, 1)]
    fv = function_vector(model, mean_heads, chosen)
    expected = torch.zeros(model.d_model)
    for layer, head in chosen:
        projection = model.heads.projection(model.hf, layer)
        z = torch.zeros(model.heads.num_heads * model.heads.head_dim)
        z[head * model.heads.head_dim:(head + 1) * model.heads.head_dim] = mean_heads[layer, head]
        expected += projection(z) - projection(torch.zeros_like(z))
    torch.testing.assert_close(fv, expected, atol=1e-5, rtol=1e-5)


def test_steer_task_end_to_end_and_a_zero_function_vector_changes_nothing(model, tmp_path):
    prompts = build_prompts(load_task(word_task(tmp_path)), n_shots=3, n_prompts=4, seed=2)
    result = steer_task(model, prompts, layers=[0, 2, 3], n_top_heads=2, aie_prompts=2, generate_examples=2,
                        max_new_tokens=3)
    n = len(prompts.zero_shot)
    assert result.hvector_correct.shape == result.fv_correct.shape == (3, n)
    assert result.aie.shape == (3, 4) and len(result.top_heads) == 2
    s = result.summary()
    assert set(s["all"]["hvector"]["per_layer"]) == {0, 2, 3}
    assert s["all"]["zero_shot"] == pytest.approx(result.zero_shot_correct.float().mean().item())
    assert [set(g) for g in result.generations] == [{"query", "answer", "plain", "hvector", "function_vector"}] * 2
    # Nothing added is the plain zero-shot answer at every layer.
    tokens, answers = encode(model, prompts.zero_shot)
    zero = last_token_logits(model, tokens, [0, 2, 3], dict.fromkeys([0, 2, 3], torch.zeros(model.d_model)))
    assert torch.equal(zero.argmax(-1) == answers, result.zero_shot_correct.expand(3, -1))


def test_lenscope_steer_writes_tables_curves_and_heatmaps(tiny_model_dir, tmp_path, capsys, wandb_spy):
    from lenscope import cli

    out = tmp_path / "out"
    cli.main(["steer", "--model", str(tiny_model_dir), "--tasks", f"[{word_task(tmp_path)}]", "--n_shots", "3",
              "--n_prompts", "4", "--aie_prompts", "2", "--n_top_heads", "3", "--generate_examples", "2",
              "--max_new_tokens", "3", "--out", str(out), "--wandb_project", "lenscope-test"])
    printed = capsys.readouterr().out
    assert "| next_word | 12 |" in printed and "top heads (block, head)" in printed
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"][0]
    assert task["task"] == "next_word" and task["layers"] == [0, 1, 2, 3] and len(task["aie"]) == 3
    assert len(task["top_heads"]) == 3 and len(task["generations"]) == 2
    assert len((out / "per_layer.csv").read_text().splitlines()) == 1 + 4
    assert len((out / "heads.csv").read_text().splitlines()) == 1 + 3 * 4
    for name in ("accuracy_next_word.png", "aie_next_word.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert [i["job_type"] for i in wandb_spy.inits] == ["steering"]
    assert {"steering/per_layer", "steering/next_word/aie"} <= wandb_spy.keys()


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "[0, 9]"], "--layers [9] out of range: residual indices are 0..3"),
    (["--n_top_heads", "13"], "--n_top_heads 13 is more than the model's 12 attention heads"),
    (["--tasks", "[]"], "--tasks is empty"),
    (["--n_shots", "0"], "--n_shots must be at least 1"),
])
def test_lenscope_steer_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, args, message):
    from lenscope import cli

    base = ["steer", "--model", str(tiny_model_dir), "--tasks", f"[{word_task(tmp_path)}]", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as stop:
        cli.main([*base, *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    # The output folder is claimed (made and locked, as train's) before the model loads; nothing is written in it.
    out = tmp_path / "o"
    assert not out.exists() or [p.name for p in out.iterdir()] == [LOCK_NAME]
