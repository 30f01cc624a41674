"""The classic methods the Patchscopes tutorial compares against, on tiny random models of several
families: the MLP and attention output sites, causal tracing and attention knockout, each checked
against plain torch hooks or the model's own padding mask."""

from __future__ import annotations

import pytest
import torch

from lenscope.errors import ConfigError
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import LoadedModel
from lenscope.model.patching import Intervention
from lenscope.patchscopes.attention_knockout import (
    attention_knockout,
    blocked_edges,
    knockout_probabilities,
)
from lenscope.patchscopes.causal_tracing import (
    Restore,
    causal_trace,
    restored_probabilities,
    subject_tokens,
)
from tests.conftest import make_tokenizer
from tests.test_adapter import LAYERS, build

FAMILIES = ["llama", "gpt2", "gpt_neox", "gptj", "qwen2"]  # sequential and parallel blocks, GQA, Conv1D
PROMPT = "w5 w6 w7 w8 w9 w10 w11"
SUBJECT = "w7 w8"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def frozen(arch: str, tokenizer, seed: int = 0) -> FrozenModel:
    hf = build(arch, seed)
    with torch.no_grad():  # larger weights than the init's: earlier tokens visibly move the answer
        for parameter in hf.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4.0)
    return FrozenModel(LoadedModel(hf, tokenizer, arch, "local"))


@pytest.mark.parametrize("arch", FAMILIES)
def test_attention_and_mlp_outputs_add_up_to_the_block_and_write_back_unchanged(arch, tokenizer):
    model = frozen(arch, tokenizer)
    ids = model.tokenize(PROMPT)
    residual = model.residuals(ids)[:, 0]
    attention = model.engine.sublayer_outputs("attention", ids)[:, 0]
    mlp = model.engine.sublayer_outputs("mlp", ids)[:, 0]
    # Sequential (LLaMA, GPT-2) and parallel (GPT-J, NeoX) blocks alike: out = in + attention + MLP.
    torch.testing.assert_close(residual[1:] - residual[:-1], attention + mlp, atol=1e-5, rtol=1e-4)
    last = torch.tensor([ids.shape[1] - 1])
    reference = model.engine.forward(ids, None, [], last)
    rows, positions = torch.zeros(ids.shape[1], dtype=torch.long), torch.arange(ids.shape[1])
    back = [Intervention(b, rows, positions, out[b], sublayer=kind)
            for kind, out in (("attention", attention), ("mlp", mlp)) for b in range(LAYERS)]
    torch.testing.assert_close(model.engine.forward(ids, None, back, last), reference, atol=1e-5, rtol=1e-5)
    # Another value at the same site does change the output: the sites are live, not copies.
    doubled = [Intervention(1, rows[:1], positions[-1:], 2 * mlp[1, -1:], sublayer="mlp")]
    assert (model.engine.forward(ids, None, doubled, last) - reference).abs().max() > 1e-4


def corrupted_reference(model, ids, draws, start, answer_id, restore=None):
    """p(answer) averaged over the noise samples, with plain torch hooks: noise added to block 0's
    input at the subject, and optionally one block output put back at one token."""
    blocks = model.adapter.blocks
    total = 0.0
    for draw in draws:
        def add_noise(module, args, kwargs, draw=draw):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[:, start:start + draw.shape[0]] += draw
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handles = [blocks[0].register_forward_pre_hook(add_noise, with_kwargs=True)]
        if restore is not None:
            layer, t, value = restore

            def put_back(module, args, output, t=t, value=value):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden[:, t] = value

            handles.append(blocks[layer].register_forward_hook(put_back))
        try:
            with torch.no_grad():
                total += torch.softmax(model.hf(input_ids=ids).logits[0, -1], -1)[answer_id].item()
        finally:
            for h in handles:
                h.remove()
    return total / len(draws)


@pytest.mark.parametrize("arch", FAMILIES)
def test_causal_tracing_restores_exactly_and_matches_torch_hooks(arch, tokenizer):
    model = frozen(arch, tokenizer)
    ids = model.tokenize(PROMPT)
    start, end = subject_tokens(model.tokenizer, PROMPT, SUBJECT)
    assert (start, end) == (2, 4)
    trace = causal_trace(model, PROMPT, SUBJECT, samples=3, window=2)
    t_len = ids.shape[1]
    assert trace.scores["residual"].shape == trace.scores["mlp"].shape == (t_len, LAYERS)
    generator = torch.Generator().manual_seed(1)
    draws = torch.randn(3, end - start, model.d_model, generator=generator) * 3 * trace.noise_std
    # Nothing restored: the corrupted run; every position restored at any block: the clean run.
    assert trace.corrupted == pytest.approx(corrupted_reference(model, ids, draws, start, trace.answer_id), abs=2e-6)
    clean = model.residuals(ids)[:, 0]
    for layer in range(LAYERS):
        everything = [Restore(layer + 1, t, clean[layer + 1, t]) for t in range(t_len)]
        p = restored_probabilities(model, ids, draws, start, [everything], trace.answer_id)[0]
        assert p == pytest.approx(trace.clean, abs=2e-6)
    assert abs(trace.clean - trace.corrupted) > 5e-5, "the noise must move the answer for the test to mean anything"
    # One cell against the hooks, and the tokens before the subject at the corrupted level.
    expected = corrupted_reference(model, ids, draws, start, trace.answer_id, (1, end - 1, clean[2, end - 1]))
    assert trace.scores["residual"][end - 1, 1].item() == pytest.approx(expected, abs=2e-6)
    assert torch.equal(trace.scores["attention"][:start], torch.full((start, LAYERS), trace.corrupted))
    # Restoring the last subject token's state at the last block is the clean state there; at the
    # last position it is the clean run.
    assert trace.scores["residual"][t_len - 1, LAYERS - 1].item() == pytest.approx(trace.clean, abs=2e-6)


def test_causal_tracing_bad_input_is_one_line(tokenizer):
    model = frozen("llama", tokenizer)
    with pytest.raises(ConfigError, match="subject 'w99' is not in the prompt"):
        causal_trace(model, PROMPT, "w99")
    with pytest.raises(ConfigError, match="layers \\[3\\] out of range: blocks are 0..2"):
        causal_trace(model, PROMPT, SUBJECT, layers=[3])
    with pytest.raises(ConfigError, match="kinds \\['mlps'\\] unknown"):
        causal_trace(model, PROMPT, SUBJECT, kinds=("mlps",))


@pytest.mark.parametrize("arch", FAMILIES)
def test_knocking_out_nothing_changes_nothing_and_everything_to_a_token_equals_masking_it(arch, tokenizer):
    model = frozen(arch, tokenizer)
    ids = model.tokenize(PROMPT)
    t = ids.shape[1]
    with torch.no_grad():
        reference = model.hf(input_ids=ids).logits[0, -1]
    answer = int(reference.argmax())
    p = torch.softmax(reference, -1)[answer].item()
    with blocked_edges(model, _one_block_hooked(t)):  # the mask rebuilt, nothing blocked
        with torch.no_grad():
            same = model.hf(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(same, reference, atol=1e-5, rtol=1e-5)
    # Every edge into token 3 (from every later query, in every block) removes its influence: the
    # same as masking token 3 out with the model's own padding mask.
    j = 3
    every = torch.zeros(1, LAYERS, t, t, dtype=torch.bool)
    every[0, :, j + 1:, j] = True
    blocked = knockout_probabilities(model, ids, answer, every)[0].item()
    mask = torch.ones_like(ids)
    mask[0, j] = 0
    with torch.no_grad():
        masked = torch.softmax(model.hf(input_ids=ids, attention_mask=mask).logits[0, -1].float(), -1)[answer].item()
    assert blocked == pytest.approx(masked, abs=2e-6)
    assert abs(blocked - p) > 5e-5, "masking a token must change the answer's probability for the test to mean anything"


def _one_block_hooked(t: int) -> torch.Tensor:
    """No edge blocked, but block 1 marked so that its hook runs: (1, LAYERS, t, t) all False except
    an edge that causality removes anyway (query 0 → key 1)."""
    marked = torch.zeros(1, LAYERS, t, t, dtype=torch.bool)
    marked[0, 1, 0, 1] = True
    return marked


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_the_knockout_curves_match_one_blocked_pass_each(arch, tokenizer):
    model = frozen(arch, tokenizer)
    result = attention_knockout(model, PROMPT, SUBJECT, window=2)
    ids = model.tokenize(PROMPT)
    t = ids.shape[1]
    assert set(result.change) == {"subject", "non-subject", "last"} and result.layers == [0, 1, 2]
    for name, keys in (("subject", [2, 3]), ("non-subject", [0, 1, 4, 5]), ("last", [t - 1])):
        for i, layer in enumerate(result.layers):
            edges = torch.zeros(1, LAYERS, t, t, dtype=torch.bool)
            for b in range(max(0, layer - 1), min(LAYERS, layer + 1)):
                edges[0, b, t - 1, keys] = True
            p = knockout_probabilities(model, ids, result.answer_id, edges)[0].item()
            assert result.change[name][i].item() == pytest.approx(100 * (p - result.probability) / result.probability,
                                                                  abs=1e-3)
    assert result.change["non-subject"].abs().max() > 1e-3


# --- LRE ----------------------------------------------------------------------------------------------
def word_facts(tmp_path, n: int = 8):
    import json

    from lenscope.patchscopes.facts import load_facts

    facts = [{"relation": "r", "subject": f"w{40 + i}", "object": f"w{80 + i}", "source": f"w1 w{40 + i}"} for i in range(n)]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"relations": {"r": {"template": "w10 w11 x"}}, "facts": facts}))
    return load_facts(path)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gptj"])
def test_the_batched_jacobian_is_autograd_s(arch, tokenizer):
    from lenscope.patchscopes.lre import jacobian_at

    model = frozen(arch, tokenizer)
    prompt, subject, layer = "w3 w4 w5 w6 w7", "w5", 1
    jacobian, h, z = jacobian_at(model, prompt, subject, layer, rows_per_pass=7)  # chunks of 7 rows
    ids = model.tokenize(prompt)
    blocks = model.adapter.blocks

    def f(state: torch.Tensor) -> torch.Tensor:
        caught = {}

        def write(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[:, 2] = state
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        def catch(module, args, output):
            caught["z"] = (output[0] if isinstance(output, tuple) else output)[0, -1]

        handles = [blocks[layer - 1].register_forward_hook(write), blocks[-1].register_forward_hook(catch)]
        try:
            model.hf(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
        return caught["z"]

    expected = torch.autograd.functional.jacobian(f, h)
    torch.testing.assert_close(jacobian, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, model.residuals(ids)[-1, 0, -1])
    assert jacobian.abs().max() > 1e-3


def test_one_training_fact_gives_back_its_own_output_and_the_lens_decodes_every_state(tmp_path, tokenizer):
    from lenscope.patchscopes.lre import (
        attribute_lens,
        faithfulness,
        fit_relation,
        jacobian_at,
        lre_prompt,
    )

    model = frozen("llama", tokenizer)
    facts = word_facts(tmp_path)
    operator, test = fit_relation(model, facts, "r", layer=2, n_train=1, beta=1.0, connector=" w12")
    assert len(test) == 7 and operator.weight.shape == (model.d_model, model.d_model)
    train = next(f for f in facts.of("r") if f.subject in operator.facts)
    prompt = lre_prompt(facts.relations["r"], [], train.subject, " w12")
    assert prompt == f"w10 w11 {train.subject} w12"
    _, h, z = jacobian_at(model, prompt, train.subject, 2)
    torch.testing.assert_close(operator(h), z, atol=1e-4, rtol=1e-4)  # first-order fit, exact at its own point
    result = faithfulness(model, facts, operator, test, connector=" w12")
    assert len(result.tested) == len(result.correct) == len(result.predictions) <= 7
    assert result.faithfulness is None or 0 <= result.faithfulness <= 1
    tokens, top = attribute_lens(model, operator, "w3 w4 w5", k=2)
    assert tokens == ["w3", "w4", "w5"] and top.shape == (LAYERS, 3, 2)


def test_lre_prefix_rule_and_bad_input(tmp_path, tokenizer):
    from lenscope.patchscopes.lre import fit_relation, is_nontrivial_prefix

    assert is_nontrivial_prefix(" Par", "Paris") and is_nontrivial_prefix("paris", "Paris")
    assert not is_nontrivial_prefix(" ", "Paris") and not is_nontrivial_prefix("Lyon", "Paris")
    model = frozen("llama", tokenizer)
    facts = word_facts(tmp_path, n=3)
    with pytest.raises(ConfigError, match="layer 3 out of range"):
        fit_relation(model, facts, "r", layer=3)
    with pytest.raises(ConfigError, match="relation 'q' is not in the fact set"):
        fit_relation(model, facts, "q", layer=1)
    with pytest.raises(ConfigError, match="has 3 facts, fewer than n_train 5 \\+ 1"):
        fit_relation(model, facts, "r", layer=1)


# --- the command lines ----------------------------------------------------------------------------------
def test_lenscope_patchscope_trace_knockout_and_lre_write_their_files(tiny_model_dir, tmp_path, capsys):
    import json

    from lenscope import cli

    cli.main(["patchscope", "trace", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--subject", SUBJECT,
              "--samples", "2", "--window", "2", "--out", str(tmp_path / "trace")])
    printed = capsys.readouterr().out
    assert "clean p =" in printed and "residual: largest indirect effect" in printed
    trace = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert set(trace["scores"]) == {"residual", "mlp", "attention"} and len(trace["scores"]["mlp"]) == 7
    assert (tmp_path / "trace" / "trace.png").read_bytes()[:4] == b"\x89PNG"

    cli.main(["patchscope", "knockout", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--subject", SUBJECT,
              "--window", "2", "--out", str(tmp_path / "knockout")])
    assert "the subject positions: largest drop" in capsys.readouterr().out
    knocked = json.loads((tmp_path / "knockout" / "knockout.json").read_text())
    assert set(knocked["change_percent"]) == {"subject", "non-subject", "last"} and knocked["layers"] == [0, 1, 2]
    assert (tmp_path / "knockout" / "knockout.png").read_bytes()[:4] == b"\x89PNG"

    word_facts(tmp_path)
    cli.main(["patchscope", "lre", "--model", str(tiny_model_dir), "--facts", str(tmp_path / "facts.json"),
              "--layers", "[1, 2]", "--n_train", "2", "--connector", " w12", "--out", str(tmp_path / "lre")])
    printed = capsys.readouterr().out
    assert "r at layer 1:" in printed and "| relation | kind | ℓ=1 | ℓ=2 |" in printed
    rows = json.loads((tmp_path / "lre" / "results.json").read_text())["relations"]
    assert [(r["relation"], r["layer"]) for r in rows] == [("r", 1), ("r", 2)]


@pytest.mark.parametrize(("args", "message"), [
    (["trace", "--prompt", PROMPT, "--subject", "w99"], "subject 'w99' is not in the prompt"),
    (["knockout", "--prompt", PROMPT, "--subject", SUBJECT, "--layers", "[5]"], "layers [5] out of range"),
    (["lre", "--layers", "[7]"], "--layers [7] out of range"),
    (["lre", "--relations", "[nope]"], "--relations has ['nope'], which the fact set lacks"),
])
def test_the_originals_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, args, message):
    from lenscope import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["patchscope", *args, "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
