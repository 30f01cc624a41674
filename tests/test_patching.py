"""The nnsight patching engine against independent computations."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from lenscope.model.adapter import ArchitectureAdapter
from lenscope.model.patching import PatchingEngine
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
