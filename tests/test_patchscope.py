"""The Patchscope spec: source → mapping → target → readout, on tiny random models."""

from __future__ import annotations

import pytest
import torch

import lenscope
from lenscope.errors import ConfigError
from lenscope.lenses.lens import AffineLens
from lenscope.lenses.patchscope import (
    Generate,
    LensPatchscope,
    NextToken,
    Patchscope,
    Source,
    Target,
)
from lenscope.lenses.trajectory import Trajectory

PROMPTS = ["w1 w2 w3 w4 w5", "w7 w8 w9", "w10 w11 w12 w13 w14 w15 w16"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def full_pass_logits(model, text: str, layer: int, position: int, state: torch.Tensor) -> torch.Tensor:
    """The reference: one unbatched engine pass over the whole prompt, read at the written position."""
    ids = model.tokenize(text)
    at = torch.tensor([position])
    return model.engine.run(ids, None, torch.tensor([layer]), at, state[None], at)[0].float()


def test_logit_lens_is_the_patch_into_the_last_block_of_the_same_prompt(model):
    layers = model.layers
    result = Patchscope(Source(PROMPTS, layers, position=-1), Target(layers="last")).run(model)
    assert result.pairs == [(s, model.num_layers) for s in layers] and result.logits.shape == (3, 3, model.vocab_size)
    for i, text in enumerate(PROMPTS):
        h = model.residuals(model.tokenize(text))[:, 0, -1]
        for p, layer in enumerate(layers):
            # decoded directly, and the real patched pass: the same numbers
            torch.testing.assert_close(result.logits[p, i], model.decode(h[layer]).float(), rtol=1e-5, atol=1e-5)
            reference = full_pass_logits(model, text, model.num_layers, len(model.tokenize(text)[0]) - 1, h[layer])
            torch.testing.assert_close(result.logits[p, i], reference, rtol=1e-5, atol=1e-5)


def test_an_explicit_target_prompt_runs_the_engine_with_a_shared_prefix(model):
    target = "w20 w21 w22 w23 w24"
    scope = Patchscope(Source(PROMPTS, [0, 1, 2], position=1), Target(target, layers="same"), rows_per_pass=4)
    result = scope.run(model)
    assert scope._prefixes[model], "the prompt before the placeholder was not shared"
    for i, text in enumerate(PROMPTS):
        h = model.residuals(model.tokenize(text))[:, 0, 1]
        for p, layer in enumerate([0, 1, 2]):
            reference = full_pass_logits(model, target, layer, 4, h[layer])
            torch.testing.assert_close(result.logits[p, i], reference, rtol=1e-5, atol=1e-5)


def test_a_grid_of_layers_a_span_position_and_a_placeholder_in_the_middle(model):
    scope = Patchscope(Source(["w3 w4 w5 w6", "w5 w9 w9"], [1, 2], position="w5"),
                       Target("w30 w31 w32 w33", layers=[0, 3], placeholder="w31"))
    result = scope.run(model)
    assert result.pairs == [(1, 0), (1, 3), (2, 0), (2, 3)]
    h = model.residuals(model.tokenize("w5 w9 w9"))[:, 0, 0]  # "w5" is token 0 of the second prompt
    reference = full_pass_logits(model, "w30 w31 w32 w33", 3, 1, h[2])
    # read at the written position (the placeholder), not at the prompt's end
    torch.testing.assert_close(result.logits[3, 1], reference, rtol=1e-5, atol=1e-5)


def test_a_placeholder_in_the_middle_shares_the_prompt_before_it(model):
    target = "w30 w31 w32 w33 w34"
    source = Source(PROMPTS, [0, 2], position=-1)
    shared = Patchscope(source, Target(target, layers=[1, 3], placeholder="w32"))
    full = Patchscope(source, Target(target, layers=[1, 3], placeholder="w32"), share_prefix=False)
    torch.testing.assert_close(shared.run(model).logits, full.run(model).logits, rtol=1e-5, atol=1e-5)
    assert [key[0] for key in shared._prefixes[model]] == [tuple(model.tokenizer(target)["input_ids"][:2])]


def test_each_source_prompt_as_its_own_target_keeps_one_prefix_at_a_time(model):
    """The rows of one document come in several passes (rows_per_pass) and share its prefix; the
    prefixes of documents already run are not kept (one per document would grow without bound)."""
    source = Source(PROMPTS, [0, 1, 2], position=-1)
    shared = Patchscope(source, Target(layers=[1, 2]), rows_per_pass=2)
    full = Patchscope(source, Target(layers=[1, 2]), rows_per_pass=2, share_prefix=False)
    torch.testing.assert_close(shared.run(model).logits, full.run(model).logits, rtol=1e-5, atol=1e-5)
    assert [key[0] for key in shared._prefixes[model]] == [tuple(model.tokenizer(PROMPTS[-1])["input_ids"][:-1])]


def test_generation_after_a_placeholder_in_the_middle_continues_from_the_prompts_end(model):
    """The CoT patchscope's shape: written inside the prompt, generated after it. Reference: every
    step one whole patched pass over the prompt and the tokens so far, read at the end."""
    target = "w60 w61 w62 w63"
    scope = Patchscope(Source(["w5 w6 w7"], [1, 2], position=-1), Target(target, layers=[2], placeholder="w61"),
                       readout=Generate(max_new_tokens=5, stop=None))
    result = scope.run(model)
    h = model.residuals(model.tokenize("w5 w6 w7"))[:, 0, -1]
    eos = model.tokenizer.eos_token_id
    for p, layer in enumerate([1, 2]):
        ids = model.tokenize(target)
        expected = []
        for _ in range(5):
            last = torch.tensor([ids.shape[1] - 1])
            token = int(model.engine.run(ids, None, torch.tensor([2]), torch.tensor([1]), h[layer][None], last)[0].argmax())
            expected.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
        assert result.tokens[p][0] == expected


def test_a_lens_as_the_mapping_decodes_as_the_lens_does(model):
    torch.manual_seed(0)
    lens = AffineLens(model.layers, model.d_model)
    with torch.no_grad():
        lens.weight.normal_(std=0.1)
        lens.bias.normal_(std=0.1)
    result = Patchscope(Source(PROMPTS[:1], model.layers), Target(layers="last"), mapping=lens).run(model)
    h = model.residuals(model.tokenize(PROMPTS[0]))[: model.num_layers, 0, -1]  # (layers, d)
    torch.testing.assert_close(result.logits[:, 0], lens.logits(model, h[:, None])[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0, 2])
def test_a_lens_asked_as_a_patchscope_reads_what_the_lens_reads_at_every_position(model, offset):
    """Patchscopes §3: a lens is the patchscope writing its mapped state into the last block's output
    of the same prompt. Run as real patched passes (one per position) and decoded directly, both
    equal the lens, at every layer and position, in a trajectory beside it."""
    torch.manual_seed(offset)
    lens = AffineLens(model.layers, model.d_model, offset=offset)
    with torch.no_grad():
        lens.weight.normal_(std=0.1)
        lens.bias.normal_(std=0.1)
    text = PROMPTS[2]
    ids = model.tokenize(text)
    h = model.residuals(ids)[model.layers]  # (layers, 1, T, d)
    expected = lens.logits(model, h)
    for directly in (False, True):
        scoped = LensPatchscope(lens, decode_directly=directly, rows_per_pass=2)
        assert scoped.key == f"{lens.key} via patchscope" and scoped.offset == offset
        torch.testing.assert_close(scoped.prompt_logits(model, h, ids), expected, rtol=1e-5, atol=1e-5)
    trajectory = Trajectory.of(model, text, [lens, LensPatchscope(lens, decode_directly=False)])
    original, scoped_panel = trajectory.panels
    assert torch.equal(original.top_ids, scoped_panel.top_ids)
    torch.testing.assert_close(original.stats["kl"], scoped_panel.stats["kl"], rtol=1e-4, atol=1e-5, equal_nan=True)
    with pytest.raises(TypeError, match="writes into the prompt it reads"):
        scoped.logits(model, h)


def test_patching_a_prompt_with_its_own_state_generates_what_the_model_generates(model):
    text = "w1 w2 w3 w4"
    scope = Patchscope(Source([text], [0, 2], position=-1), Target(text, layers="same"),
                       readout=Generate(max_new_tokens=6, stop=None))
    result = scope.run(model)
    ids = model.tokenize(text)
    with torch.no_grad():
        plain = model.hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=3, eos_token_id=None)[0, ids.shape[1]:]
    expected = plain.tolist()
    eos = model.tokenizer.eos_token_id
    ended = expected[: expected.index(eos) + 1] if eos in expected else expected  # generation ends at EOS
    for p in range(2):
        assert result.tokens[p][0] == ended
        assert result.texts[p][0] == model.tokenizer.decode([t for t in ended if t != eos])
    # a different state changes the continuation: the patch is applied
    other = Patchscope(Source(["w100 w150 w199"], [2], position=-1), Target(text, layers="same"),
                       readout=Generate(max_new_tokens=6, stop=None)).run(model)
    assert other.tokens[0][0] != ended


def test_generation_stops_at_the_stop_text(model):
    scope = Patchscope(Source(PROMPTS, [1], position=-1), Target("w40 w41", layers="same"),
                       readout=Generate(max_new_tokens=8, stop=None))
    free = scope.run(model).texts[0]
    stop = free[0].split(" ")[2]  # the third generated word of the first prompt
    stopped = Patchscope(Source(PROMPTS, [1], position=-1), Target("w40 w41", layers="same"),
                         readout=Generate(max_new_tokens=8, stop=stop)).run(model).texts[0]
    assert stopped[0] == free[0].split(stop)[0] and stop not in stopped[0]


def test_cross_model_patching_writes_into_another_model(model, tmp_path):
    from tests.conftest import make_tokenizer, tiny_llama

    other_dir = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other_dir)
    make_tokenizer().save_pretrained(other_dir)
    other = lenscope.load_model(str(other_dir))
    scope = Patchscope(Source(PROMPTS[:1], [1], position=-1), Target("w50 w51", layers="same"))
    h = model.residuals(model.tokenize(PROMPTS[0]))[1, 0, -1]
    crossed = scope.run(model, target_model=other).logits[0, 0]
    torch.testing.assert_close(crossed, full_pass_logits(other, "w50 w51", 1, 1, h), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(crossed, scope.run(model).logits[0, 0])


@pytest.mark.parametrize(("scope", "expected"), [
    (lambda: Patchscope(Source(["w1 w2"], [1], position="w9"), Target("w3")), "source 'w9' is not in the prompt 'w1 w2'"),
    (lambda: Patchscope(Source(["w1 w2"], [1], position=5), Target("w3")), "source position 5 is outside 'w1 w2'"),
    (lambda: Patchscope(Source(["w1 w2"], [9]), Target("w3")), "source layer 9 is out of range: residual indices are 0..3"),
    (lambda: Patchscope(Source(["w1 w2"], [1]), Target("w3 w4", layers=[7])), "target layer 7 is out of range"),
    (lambda: Patchscope(Source(["w1 w2"], [1]), Target("w3 w4", placeholder="w8")), "target placeholder 'w8' is not in"),
    (lambda: Patchscope(Source([], [1]), Target("w3")), "has no prompts"),
])
def test_bad_specs_are_one_line_errors(model, scope, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        scope().run(model)
    assert "\n" not in str(info.value)


def test_next_token_result_names_the_top_tokens(model):
    result = Patchscope(Source(PROMPTS[:2], [3]), Target(layers="last"), readout=NextToken()).run(model)
    top = result.top_tokens(model.tokenizer, k=2)
    assert len(top) == 1 and len(top[0]) == 2 and all(len(t) == 2 for t in top[0])
    assert top[0][0][0] == model.tokenizer.decode([int(result.logits[0, 0].argmax())])


def test_only_lenses_that_map_states_are_mappings(model):
    from lenscope.lenses.learned_prompt import LearnedPromptLens

    prompt = LearnedPromptLens(model.layers, model.d_model, offset=1, prompt_length=2)
    with pytest.raises(ConfigError, match="learned_prompt lens decodes through the model and maps no state"):
        Patchscope(Source(PROMPTS, [1]), Target(layers="last"), mapping=prompt)
    short = AffineLens([0, 1], model.d_model)
    with pytest.raises(ConfigError, match="has no translator for residual index 2"):
        Patchscope(Source(PROMPTS, [2]), Target(layers="last"), mapping=short).run(model)


def test_patching_into_a_model_of_another_width_without_a_mapping_is_one_line(model, tmp_path):
    from tests.conftest import make_tokenizer, tiny_llama

    wide_dir = tmp_path / "wide"
    tiny_llama(seed=1, d_model=48).save_pretrained(wide_dir)
    make_tokenizer().save_pretrained(wide_dir)
    wide = lenscope.load_model(str(wide_dir))
    scope = Patchscope(Source(PROMPTS[:1], [1]), Target("w50 w51"))
    with pytest.raises(ConfigError, match="width 32 and the target model 48; .* needs a mapping"):
        scope.run(model, target_model=wide)
