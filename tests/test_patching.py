"""The nnsight patching engine against independent computations."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from lenscope.model.adapter import ArchitectureAdapter
from lenscope.model.patching import Intervention, PatchingEngine
from lenscope.model.residuals import ResidualReader
from tests.conftest import TINY_DECODER, make_tokenizer

VOCAB = 128
COMMON = dict(**TINY_DECODER, vocab_size=VOCAB)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON),
    "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=5.0),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, vocab_size=VOCAB),
}


@pytest.fixture(params=sorted(CONFIGS))
def engine(request) -> PatchingEngine:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    assert sum(p.numel() for p in model.parameters()) < 100_000
    adapter = ArchitectureAdapter.discover(model)
    return PatchingEngine(ResidualReader(model, make_tokenizer(), adapter))


def ids(n: int = 4, t: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_logit_lens_as_a_patchscope_equals_the_logit_lens(engine):
    x = ids()
    residuals = engine.reader.read(x)  # (L+1, N, T, d)
    last = engine.adapter.num_layers
    rows = torch.arange(4)
    pos = torch.tensor([2, 5, 8, 0])
    for layer in range(last):
        source = residuals[layer, rows, pos]
        patched = engine.run(x, None, torch.full((4,), last), pos, source, pos)
        expected = engine.adapter.decode(source)
        diff = (torch.log_softmax(patched, -1) - torch.log_softmax(expected, -1)).abs().max()
        assert diff < 1e-4, f"layer {layer}: {diff}"


def test_writing_back_the_original_state_changes_nothing(engine):
    x = ids()
    residuals = engine.reader.read(x)
    with torch.no_grad():
        reference = engine.adapter.model(input_ids=x).logits
    layers = torch.tensor([0, 1, 2, 3])
    pos = torch.tensor([3, 3, 6, 1])
    read = torch.tensor([8, 4, 6, 2])
    rows = torch.arange(4)
    states = residuals[layers, rows, pos]
    patched = engine.run(x, None, layers, pos, states, read)
    torch.testing.assert_close(patched, reference[rows, read], atol=1e-5, rtol=0)
    # ... because the engine wrote the same state, not because it wrote nothing: another state, same places.
    other = engine.run(x, None, layers, pos, states + torch.randn(states.shape, generator=torch.Generator().manual_seed(0)), read)
    change = (other - reference[rows, read]).abs().amax(-1)
    assert (change[:3] > 1e-3).all(), "a different state must change what later blocks compute"
    # Row 3 wrote the last block's output at position 1: no block runs after it, so position 2 cannot see it.
    assert change[3] == 0


def test_source_layer_after_target_layer_matches_a_plain_hook(engine):
    """Patch block-2 states into block 0's output: compare with a torch forward hook doing the same."""
    source, target = ids(seed=1), ids(seed=2)
    states = engine.reader.read(source)[3, :, 4]  # output of block 2 at position 4, (N, d)
    patched = engine.run(target, None, torch.full((4,), 1), torch.full((4,), 6), states, torch.full((4,), 8))

    model = engine.adapter.model

    def replace(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, 6] = states
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = engine.adapter.blocks[0].register_forward_hook(replace)
    try:
        with torch.no_grad():
            expected = model(input_ids=target).logits[:, 8]
    finally:
        handle.remove()
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=0)
    assert (patched - model(input_ids=target).logits[:, 8]).abs().max() > 1e-3, "the patch must matter"


def test_one_batched_pass_equals_one_pass_per_row(engine):
    source, target = ids(seed=3), ids(seed=4)
    residuals = engine.reader.read(source)
    layers = torch.tensor([2, 0, 3, 1])
    write = torch.tensor([8, 8, 8, 8])
    rows = torch.arange(4)
    states = residuals[layers, rows, torch.tensor([1, 4, 7, 2])]
    batched = engine.run(target, None, layers, write, states, write)
    for n in range(4):
        single = engine.run(target[n:n + 1], None, layers[n:n + 1], write[n:n + 1], states[n:n + 1], write[n:n + 1])
        torch.testing.assert_close(batched[n:n + 1], single, atol=1e-5, rtol=0)


def test_bad_layer_is_refused(engine):
    x = ids()
    with pytest.raises(ValueError, match="residual indices"):
        engine.run(x, None, torch.full((4,), 99), torch.zeros(4, dtype=torch.long), torch.zeros(4, 32),
                   torch.zeros(4, dtype=torch.long))


def test_only_passes_whose_every_row_is_overwritten_skip_blocks():
    """Blocks below the lowest write go only in a one-token pass whose every row's residual is
    replaced; an addition, a head, a row left alone or a second token keep every block."""
    rows, at, values = torch.arange(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, 8)
    skippable = PatchingEngine.skippable_blocks
    assert skippable([Intervention(3, rows[:1], at[:1], values[:1]), Intervention(2, rows[1:], at[1:], values[1:])], 1, 2) == 2
    assert skippable([Intervention(3, rows, at, values)], 2, 2) == 0  # a second token reads the blocks below
    assert skippable([Intervention(3, rows[:1], at[:1], values[:1])], 1, 2) == 0  # row 1 is not written
    assert skippable([Intervention(3, rows, at, values, add=True)], 1, 2) == 0  # adds to what the blocks give
    assert skippable([Intervention(3, rows, at, values[:, :4], heads=torch.zeros(2, dtype=torch.long))], 1, 2) == 0
    assert skippable([Intervention(3, rows, at, values), Intervention(5, rows, at, values)], 1, 2) == 0  # row twice


def test_a_differentiable_write_at_the_embeddings_of_one_row(engine):
    """One row, its state written (or added) at residual 0 of a pass on input embeddings that require
    grad (a learned prompt of one row): the write takes, and gradients reach the embeddings."""
    model = engine.adapter.model
    embeds = model.get_input_embeddings()(ids(1, 5)).detach().requires_grad_(True)
    state = torch.randn(1, embeds.shape[-1], generator=torch.Generator().manual_seed(2))
    zero, at = torch.zeros(1, dtype=torch.long), torch.full((1,), 4)
    for add in (False, True):
        change = Intervention(0, zero, zero + 2, state, add=add)
        logits = engine.forward(None, None, [change], at, inputs_embeds=embeds)

        def edit(module, args, kwargs, add=add):  # block 0's input, changed by a plain hook
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[0, 2] = hidden[0, 2] + state[0] if add else state[0]
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        hook = engine.adapter.blocks[0].register_forward_pre_hook(edit, with_kwargs=True)
        try:
            with torch.no_grad():
                expected = model(inputs_embeds=embeds).logits[:, 4]
        finally:
            hook.remove()
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        (grad,) = torch.autograd.grad(logits.sum(), embeds)
        assert grad[0, 2].abs().sum() == 0 if not add else grad[0, 2].abs().sum() > 0  # the write replaced it
        assert grad[0, 3].abs().sum() > 0
