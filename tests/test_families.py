"""Every family of ``tests/test_adapter.py`` (29 of them: mixtures of experts, state-space and
hybrid models, forward-time logit scaling and soft-caps, parallel attention, ALiBi, multi-query and
latent attention, ...) through the rest of lenscope: writing a state back changes nothing, the
token-identity patchscope equals full passes (whatever cache the model has), and one lens training
step runs with the fused loss equal to the unfused one and lowers the loss."""

from __future__ import annotations

import pytest
import torch

from lenscope.datamodules.preprocessing import collate
from lenscope.errors import ConfigError
from lenscope.lenses.learned_prompt import LearnedPromptLens
from lenscope.lenses.token_identity import token_identity
from lenscope.lenses.unembed import lens_kl, reference_kl
from lenscope.model.adapter import ArchitectureAdapter
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import LoadedModel
from lenscope.model.patching import PatchingEngine
from lenscope.model.residuals import ResidualReader
from lenscope.training.lens_module import LensTrainingModule
from tests.conftest import make_tokenizer, training_step
from tests.test_adapter import CONFIGS, LAYERS, VOCAB, build

FAMILIES = sorted(CONFIGS)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def engine_for(arch: str, tokenizer) -> PatchingEngine:
    model = build(arch)
    return PatchingEngine(ResidualReader(model, tokenizer, ArchitectureAdapter.discover(model)))


def random_ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_there_are_enough_families():
    assert len(FAMILIES) >= 20
    moe = {"mixtral", "qwen2_moe", "deepseek_v3"} & set(FAMILIES)
    assert len(moe) >= 2 and {"mamba", "cohere", "granite"} <= set(FAMILIES)


@pytest.mark.parametrize("arch", FAMILIES)
def test_writing_back_the_models_own_state_changes_nothing(arch, tokenizer):
    engine = engine_for(arch, tokenizer)
    x = random_ids(4, 7, seed=1)
    residuals = engine.reader.read(x)
    with torch.no_grad():
        reference = engine.adapter.model(input_ids=x).logits
    rows = torch.arange(4)
    layers = torch.tensor([0, 1, 2, LAYERS])
    write = torch.tensor([3, 6, 2, 5])
    read = torch.tensor([6, 6, 4, 5])
    states = residuals[layers, rows, write]
    patched = engine.run(x, None, layers, write, states, read)
    torch.testing.assert_close(patched, reference[rows, read], atol=1e-4, rtol=1e-4)
    # ... because the engine wrote the same state, not because it wrote nothing: another state, read
    # where it was written (the residual path carries it straight to the logits there).
    noise = torch.randn(states.shape, generator=torch.Generator().manual_seed(0)) * states.std()
    other = engine.run(x, None, layers, write, states + noise, write)
    change = (other - reference[rows, write]).abs().amax(-1)
    assert (change > 1e-2).all(), f"a different state must change every row: {change}"


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_one_token_pass_skips_the_blocks_below_its_writes(arch, tokenizer, monkeypatch):
    """A one-token pass (on a prompt's cache, where the model has one), every row written at
    residual index ≥ 2: the engine runs no block below 2, and reads what the same pass running every
    block reads, and what the whole prompt's pass with the same writes reads."""
    model = FrozenModel(LoadedModel(build(arch), tokenizer, arch, "local"))
    engine = model.engine
    ids = random_ids(1, 6, seed=3).expand(3, -1)
    layers = torch.tensor([2, LAYERS, 2])  # the row written at L runs blocks 2.. on its own state
    states = torch.randn(3, model.d_model, generator=torch.Generator().manual_seed(5))
    first = torch.zeros(3, dtype=torch.long)

    def one_token_pass(count_block_1: list | None = None):
        cache = model.prompt_cache(ids[:, :5])
        mask = None if cache is None else torch.ones(3, 6, dtype=torch.long)
        block = list(model.adapter.blocks[1].modules())[1:] if count_block_1 is not None else []
        hooks = [m.register_forward_pre_hook(lambda *a: count_block_1.append(1)) for m in block]
        try:
            return engine.run(ids[:, 5:], mask, layers, first, states, first, past_key_values=cache)
        finally:
            for hook in hooks:
                hook.remove()

    calls = []
    skipped = one_token_pass(calls)
    assert not calls, "block 1 ran although every row's state is written above it"
    monkeypatch.setattr(PatchingEngine, "skippable_blocks", staticmethod(lambda *args: 0))
    torch.testing.assert_close(skipped, one_token_pass(), atol=1e-4, rtol=1e-4)
    if model.prompt_cache(ids[:, :5]) is not None:
        last = torch.full((3,), 5)
        torch.testing.assert_close(skipped, engine.run(ids, None, layers, last, states, last), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
def test_token_identity_equals_full_passes(arch, tokenizer):
    model = FrozenModel(LoadedModel(build(arch), tokenizer, arch, "local"))
    states = model.residuals(random_ids(3, 6, seed=2))[:LAYERS, :, -1]  # (layers, 3, d)
    layers = list(range(LAYERS))
    prompt = "w1 w2 w3 w4 w5 w6"
    shared = token_identity(prompt, rows_per_pass=4).patch(model, states, layers).logits
    full = token_identity(prompt, rows_per_pass=4, share_prefix=False).patch(model, states, layers).logits
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_learned_prompt_on_its_shared_prefix_equals_full_passes(arch, tokenizer):
    model = FrozenModel(LoadedModel(build(arch), tokenizer, arch, "local"))
    lens = LearnedPromptLens(model.layers, model.d_model, offset=1, prompt_length=4)
    embeddings = model.hf.get_input_embeddings().weight
    if embeddings.shape[1] != model.d_model:  # a projected embedding (OPT's project_in): a clear refusal
        with pytest.raises(ConfigError, match="a learned prompt needs the two equal"):
            lens.logits(model, torch.zeros(len(model.layers), 1, model.d_model))
        return
    with torch.no_grad():  # a prompt at the scale of the model's embeddings, different per layer
        lens.prompt.normal_(0, float(embeddings.std()), generator=torch.Generator().manual_seed(4))
    states = model.residuals(random_ids(3, 6, seed=2))[: len(model.layers), :, -1]
    lens.rows_per_pass = 4  # chunks that cut across layers
    shared = lens.logits(model, states)
    lens.share_prefix = False
    full = lens.logits(model, states)
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    if arch == "llama":
        assert lens._prefix_works[model], "the shared prefix must be used where the cache works"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """Each family saved as a Hugging Face folder, as ``--model.base.name`` takes it."""
    def save(arch: str):
        path = tmp_path_factory.mktemp(arch)
        model = build(arch)
        with torch.no_grad():  # peaked distributions, so that the lens loss is well above rounding
            model.get_output_embeddings().weight.mul_(10.0)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return save


@pytest.mark.parametrize("arch", FAMILIES)
def test_one_training_step(arch, model_dirs):
    module = LensTrainingModule(base=str(model_dirs(arch)), lens_dtype="float32", cache="none")
    samples = [{"input_ids": ids, "positions": list(range(len(ids) - 1)), "labels": ids[1:]}
               for ids in random_ids(2, 8, seed=3).tolist()]
    batch = collate(samples, pad_id=0)

    def loss() -> torch.Tensor:
        return training_step(module, batch)

    with torch.no_grad():  # start away from the logit lens, so the loss is well above rounding everywhere
        generator = torch.Generator().manual_seed(4)
        for p in module.lenses.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    before = loss()
    before.backward()
    grads = [p.grad for p in module.lenses.parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # A small enough step down the gradient lowers the loss (the gradient points the right way).
    start = [p.detach().clone() for p in module.lenses.parameters()]
    lowered = []
    for lr in (1e-1, 1e-2, 1e-3):
        with torch.no_grad():
            for p, p0 in zip(module.lenses.parameters(), start, strict=True):
                p.copy_(p0 - lr * p.grad)
        lowered.append(loss().item() < before.item())
    assert any(lowered), f"no step lowered the loss {before.item():.4g}"

    # The fused loss (the model's scale and soft-cap applied inside it) equals plain autograd.
    states = module.hidden_states(batch)
    h = module.frozen.adapter.normalize(module.lenses["tuned"](states[module.layers].float()))
    target = module._target_log_probs(states[-1])
    torch.testing.assert_close(lens_kl(module.frozen.adapter, h, target, torch.float32),
                               reference_kl(module.frozen.adapter, h, target), atol=1e-4, rtol=1e-4)
