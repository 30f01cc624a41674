"""Attention heads on every family of ``tests/test_adapter.py`` that has attention (grouped-query,
multi-query, latent, parallel-attention blocks, ALiBi, hybrids with recurrent layers): found by
what the output projection does, read, written and added to through the patching engine, and
interventions held through greedy generation."""

from __future__ import annotations

import pytest
import torch

from lenscope.model.frozen import FrozenModel
from lenscope.model.heads import HeadsError
from lenscope.model.loading import LoadedModel
from lenscope.model.patching import Intervention
from tests.conftest import make_tokenizer
from tests.test_adapter import CONFIGS, LAYERS, VOCAB, build

WITH_ATTENTION = sorted(set(CONFIGS) - {"mamba"})

# What the discovery must find, named by the families' own module names (a guard: the discovery
# itself never looks at names).
KNOWN = {"gpt2": "transformer.h.{}.attn.c_proj", "gpt_neox": "gpt_neox.layers.{}.attention.dense",
         "gptj": "transformer.h.{}.attn.out_proj", "llama": "model.layers.{}.self_attn.o_proj",
         "bloom": "transformer.h.{}.self_attention.dense", "falcon": "transformer.h.{}.self_attention.dense",
         "opt": "model.decoder.layers.{}.self_attn.out_proj", "phi": "model.layers.{}.self_attn.dense"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def frozen(arch: str, tokenizer) -> FrozenModel:
    return FrozenModel(LoadedModel(build(arch), tokenizer, arch, "local"))


def random_ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def projection_io(model: FrozenModel, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each attention block's output projection input and output, caught with plain torch hooks."""
    heads = model.engine.heads
    caught = {}
    handles = [heads.projection(model.hf, b).register_forward_hook(
        lambda m, a, o, b=b: caught.__setitem__(b, (a[0].detach(), o.detach()))) for b in heads.layers]
    try:
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return caught


def test_the_families_cover_what_the_issue_asks():
    assert len(WITH_ATTENTION) >= 5
    assert {"gptj", "gpt_neox", "llama", "mistral", "gpt_bigcode", "jamba"} <= set(WITH_ATTENTION)
    assert CONFIGS["llama"]().num_key_value_heads < CONFIGS["llama"]().num_attention_heads  # grouped-query


@pytest.mark.parametrize("arch", WITH_ATTENTION)
def test_heads_read_through_the_projection_sum_to_the_attention_output(arch, tokenizer):
    model = frozen(arch, tokenizer)
    heads = model.engine.heads
    if arch in KNOWN:
        assert list(heads.projections) == [KNOWN[arch].format(b) for b in range(LAYERS)]
    ids = random_ids(2, 7, seed=3)
    z = model.head_outputs(ids)  # (layers with heads, 2, 7, H, dh)
    assert z.shape == (len(heads.layers), 2, 7, heads.num_heads, heads.head_dim)
    caught = projection_io(model, ids)
    for i, layer in enumerate(heads.layers):
        torch.testing.assert_close(z[i].flatten(-2), caught[layer][0], atol=0, rtol=0)
        per_head = heads.contribution(model.hf, layer, z[i])  # (2, 7, H, d)
        bias = heads.contribution(model.hf, layer, torch.zeros_like(z[i][:, :, :1]), with_bias=True)[:, :, 0]
        total = per_head.sum(-2) + bias
        assert (total - caught[layer][1]).abs().max() < 1e-5


@pytest.mark.parametrize("arch", WITH_ATTENTION)
def test_writing_the_heads_back_changes_nothing_and_other_values_change_the_output(arch, tokenizer):
    model = frozen(arch, tokenizer)
    heads = model.engine.heads
    ids = random_ids(3, 6, seed=4)
    with torch.no_grad():
        reference = model.hf(input_ids=ids).logits[:, -1]
    z = model.head_outputs(ids)
    last = torch.full((3,), 5)
    everything = []
    for i, layer in enumerate(heads.layers):
        rows, positions, hs = torch.meshgrid(torch.arange(3), torch.arange(6), torch.arange(heads.num_heads), indexing="ij")
        rows, positions, hs = rows.flatten(), positions.flatten(), hs.flatten()
        everything.append(Intervention(layer, rows, positions, z[i][rows, positions, hs], heads=hs))
    same = model.engine.forward(ids, None, everything, last)
    torch.testing.assert_close(same, reference, atol=1e-5, rtol=1e-5)
    # One head of the last attention block, row 1 only, made 3x larger: an exact reference with a
    # torch pre-hook, and the other rows unchanged.
    layer, head = heads.layers[-1], heads.num_heads - 1
    value = z[-1][1, 5, head] * 3
    change = Intervention(layer, torch.tensor([1]), torch.tensor([5]), value[None], heads=torch.tensor([head]))
    patched = model.engine.forward(ids, None, [change], last)

    def pre_hook(module, args):
        x = args[0].clone()
        x[1, 5, head * heads.head_dim:(head + 1) * heads.head_dim] = value
        return (x, *args[1:])

    handle = heads.projection(model.hf, layer).register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            expected = model.hf(input_ids=ids).logits[:, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)
    assert (patched[1] - reference[1]).abs().max() > 1e-4
    torch.testing.assert_close(patched[[0, 2]], reference[[0, 2]], atol=1e-5, rtol=1e-5)


def test_adding_to_a_head_equals_writing_the_sum(tokenizer):
    model = frozen("llama", tokenizer)
    ids = random_ids(2, 5, seed=5)
    z = model.head_outputs(ids, layers=[1])[0]
    delta = torch.randn(2, model.engine.heads.head_dim, generator=torch.Generator().manual_seed(1))
    rows, at, hs = torch.tensor([0, 1]), torch.tensor([4, 2]), torch.tensor([0, 3])
    read = torch.tensor([4, 4])
    added = model.engine.forward(ids, None, [Intervention(1, rows, at, delta, heads=hs, add=True)], read)
    written = model.engine.forward(ids, None, [Intervention(1, rows, at, z[rows, at, hs] + delta, heads=hs)], read)
    torch.testing.assert_close(added, written, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["jamba", "recurrent_gemma"])
def test_a_hybrid_has_heads_only_in_its_attention_layers(arch, tokenizer):
    model = frozen(arch, tokenizer)
    heads = model.engine.heads
    assert 0 < len(heads.layers) < LAYERS
    recurrent = next(b for b in range(LAYERS) if b not in heads.layers)
    with pytest.raises(HeadsError, match=f"block {recurrent} has no attention heads") as err:
        model.head_outputs(random_ids(1, 4, seed=0), layers=[recurrent])
    assert "\n" not in str(err.value)


def test_heads_out_of_range_and_a_model_without_attention_are_refused_in_one_line(tokenizer):
    model = frozen("llama", tokenizer)
    ids = random_ids(1, 4, seed=0)
    value = torch.zeros(1, model.engine.heads.head_dim)
    for layer, head, match in ((LAYERS, 0, "attention layer 3 out of range: blocks are 0..2"),
                               (0, 4, "head 4 out of range: the model has heads 0..3")):
        with pytest.raises(HeadsError, match=match):
            model.engine.forward(ids, None, [Intervention(layer, torch.tensor([0]), torch.tensor([3]), value,
                                                          heads=torch.tensor([head]))], torch.tensor([3]))
    with pytest.raises(HeadsError, match="no num_attention_heads in its config"):
        _ = frozen("mamba", tokenizer).engine.heads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_an_intervention_held_through_generation(arch, tokenizer):
    model = frozen(arch, tokenizer)
    ids = random_ids(2, 5, seed=6)
    steps = 6
    with torch.no_grad():
        plain = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)[:, 5:]
    layer = 2
    zero = Intervention(layer, torch.arange(2), torch.full((2,), 4), torch.zeros(2, model.d_model), add=True)
    assert torch.equal(model.engine.generate(ids, [zero], max_new_tokens=steps), plain)
    # A real vector, held on every new token: the same as re-running the whole sequence each step
    # with the vector added at the prompt's last position and every generated one.
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2)) * 3
    steer = Intervention(layer, torch.arange(2), torch.full((2,), 4), vector.expand(2, -1), add=True)
    held = model.engine.generate(ids, [steer], max_new_tokens=steps)
    sequence = ids
    for _ in range(steps):
        t = sequence.shape[1]
        rows, positions = torch.meshgrid(torch.arange(2), torch.arange(4, t), indexing="ij")
        full = Intervention(layer, rows.flatten(), positions.flatten(), vector.expand(rows.numel(), -1), add=True)
        token = model.engine.forward(sequence, None, [full], torch.full((2,), t - 1)).argmax(-1)
        sequence = torch.cat([sequence, token[:, None]], 1)
    assert torch.equal(held, sequence[:, 5:])
    assert not torch.equal(held, plain), "the vector must change the generation for the test to mean anything"
    # Not held: only the prompt pass is steered.
    once = model.engine.generate(ids, [steer], max_new_tokens=steps, hold=False)
    assert once[:, 0].tolist() == held[:, 0].tolist()
