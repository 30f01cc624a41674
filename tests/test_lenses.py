"""Lenses, the fused lens loss, and lens artifacts."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from transformers import AutoModelForCausalLM

from lenscope.lenses.artifact import (
    CONFIG,
    WEIGHTS,
    LensArtifactError,
    load_lens,
    read_config,
    save_lens,
)
from lenscope.lenses.lens import LogitLens, TunedLens
from lenscope.lenses.unembed import lens_kl, lens_metrics, reference_kl
from lenscope.model.adapter import ArchitectureAdapter
from lenscope.model.loading import tensor_fingerprint
from tests.conftest import TINY_DECODER, tiny_llama

D = 32
LAYERS = 3


def tiny_gemma2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = T.Gemma2Config(
        **TINY_DECODER,
        head_dim=8,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        final_logit_softcapping=5.0,
        sliding_window=16,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    assert sum(p.numel() for p in model.parameters()) < 100_000
    with torch.no_grad():  # make the soft-cap matter (random-init logits are far below 5)
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def llama_decoder() -> ArchitectureAdapter:
    model = tiny_llama()
    model.requires_grad_(False)
    return ArchitectureAdapter.discover(model)


@pytest.fixture(scope="module")
def gemma2_decoder() -> ArchitectureAdapter:
    model = tiny_gemma2()
    model.requires_grad_(False)
    decoder = ArchitectureAdapter.discover(model)
    assert decoder.softcap == 5.0
    return decoder


def residuals(seed: int, n: int = 10, layers: int = LAYERS) -> torch.Tensor:
    """(layers, n, d) random residuals with a model-like scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, n, D, generator=g)


def random_tuned_lens(seed: int, bias: bool = True, scale: float = 0.1) -> TunedLens:
    lens = TunedLens(list(range(LAYERS)), D, bias=bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=g) * scale)
        if bias:
            lens.bias.copy_(torch.randn(lens.bias.shape, generator=g) * scale)
    return lens


# --- lenses ---------------------------------------------------------------------------------------


def test_zero_tuned_lens_equals_logit_lens(llama_decoder):
    h = residuals(0).view(LAYERS, 2, 5, D)
    tuned = TunedLens(list(range(LAYERS)), D)
    logit = LogitLens(list(range(LAYERS)), D)
    torch.testing.assert_close(tuned(h), logit(h), rtol=0, atol=0)
    torch.testing.assert_close(
        llama_decoder.decode(tuned(h)), llama_decoder.decode(logit(h)), rtol=0, atol=0
    )


def test_tuned_lens_batched_equals_per_layer_loop():
    lens = random_tuned_lens(1)
    h = residuals(2).view(LAYERS, 2, 5, D)
    out = lens(h)
    assert out.shape == h.shape
    for layer in range(LAYERS):
        expected = h[layer] + h[layer] @ lens.weight[layer].T + lens.bias[layer]
        torch.testing.assert_close(out[layer], expected)
    assert (out - h).abs().max() > 1e-2  # the translators are not the identity here


def test_tuned_lens_without_bias():
    lens = random_tuned_lens(3, bias=False)
    assert lens.bias is None
    assert set(dict(lens.named_parameters())) == {"weight"}
    assert lens.extra_config() == {"bias": False, "offset": 0}
    h = residuals(4)
    out = lens(h)
    for layer in range(LAYERS):
        torch.testing.assert_close(out[layer], h[layer] + h[layer] @ lens.weight[layer].T)
    out.square().sum().backward()
    assert lens.weight.grad is not None and lens.weight.grad.abs().sum() > 0


def test_tuned_lens_keeps_input_dtype():
    lens = random_tuned_lens(5)
    h = residuals(6).to(torch.bfloat16)
    out = lens(h)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), lens(h.float()), atol=0.05, rtol=0.02)


def test_tuned_lens_rejects_negative_offset():
    with pytest.raises(ValueError, match="offset"):
        TunedLens([0, 1], D, offset=-1)


# --- fused KL -------------------------------------------------------------------------------------


def _target(decoder: ArchitectureAdapter, seed: int, n: int = 10) -> torch.Tensor:
    """(n, V) fp32 log-probabilities of the model's decoding of random last-block residuals."""
    with torch.no_grad():
        return decoder.log_probs(residuals(seed, n, 1)[0])


def _kl_and_grads(decoder: ArchitectureAdapter, fn, lens: TunedLens, h: torch.Tensor, target: torch.Tensor):
    lens.zero_grad()
    x = decoder.normalize(lens(h))
    loss = fn(x)
    weights = torch.linspace(0.5, 1.5, loss.shape[0])  # distinct per-layer upstream gradients
    (loss * weights).sum().backward()
    return loss.detach(), lens.weight.grad.clone(), lens.bias.grad.clone()


@pytest.mark.parametrize("which", ["llama", "gemma2"])
def test_fused_kl_matches_reference_fp32(which, llama_decoder, gemma2_decoder):
    decoder = llama_decoder if which == "llama" else gemma2_decoder
    lens = random_tuned_lens(7)
    h = residuals(8)
    target = _target(decoder, 9)
    fused = _kl_and_grads(
        decoder, lambda x: lens_kl(decoder, x, target, compute_dtype=torch.float32), lens, h, target
    )
    ref = _kl_and_grads(decoder, lambda x: reference_kl(decoder, x, target), lens, h, target)
    assert fused[0].shape == (LAYERS,) and fused[0].dtype == torch.float32
    assert (fused[0] > 0.01).all()
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert fused[1].abs().max() > 1e-4


def test_reference_kl_is_plain_kl(gemma2_decoder):
    """The yardstick itself: KL(p ‖ q) with q the soft-capped decoding, by definition."""
    decoder = gemma2_decoder
    x = decoder.normalize(residuals(10))
    target = _target(decoder, 11)
    logq = torch.log_softmax(torch.tanh(F.linear(x, decoder.unembedding_weight) / 5.0) * 5.0, -1)
    expected = (target.exp() * (target - logq)).sum(-1).mean(-1)
    torch.testing.assert_close(reference_kl(decoder, x, target), expected)


def test_fused_kl_zero_for_the_models_own_output(llama_decoder):
    h_last = residuals(12, layers=1)
    target = llama_decoder.log_probs(h_last[0])
    kl = lens_kl(
        llama_decoder, llama_decoder.normalize(h_last), target, compute_dtype=torch.float32
    )
    assert kl.abs().max() < 1e-5


@pytest.mark.parametrize("which", ["llama", "gemma2"])
def test_fused_kl_bf16_close_to_fp32(which, llama_decoder, gemma2_decoder):
    decoder = llama_decoder if which == "llama" else gemma2_decoder
    lens = random_tuned_lens(13)
    h = residuals(14)
    target = _target(decoder, 15)
    bf16 = _kl_and_grads(
        decoder,
        lambda x: lens_kl(decoder, x, target, compute_dtype=torch.bfloat16),
        lens,
        h,
        target,
    )
    ref = _kl_and_grads(decoder, lambda x: reference_kl(decoder, x, target), lens, h, target)
    assert bf16[0].dtype == torch.float32
    torch.testing.assert_close(bf16[0], ref[0], rtol=0.03, atol=0.01)
    for a, b in zip(bf16[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


def test_fused_kl_without_grad(llama_decoder):
    x = llama_decoder.normalize(residuals(16))
    target = _target(llama_decoder, 17)
    kl = lens_kl(llama_decoder, x, target, compute_dtype=torch.float32)
    assert not kl.requires_grad
    torch.testing.assert_close(kl, reference_kl(llama_decoder, x, target))


@pytest.mark.parametrize("which", ["llama", "gemma2"])
def test_lens_metrics(which, llama_decoder, gemma2_decoder):
    decoder = llama_decoder if which == "llama" else gemma2_decoder
    n = 12
    with torch.no_grad():
        x = decoder.normalize(random_tuned_lens(18)(residuals(19, n)))
    target = _target(decoder, 20, n)
    vocab = decoder.unembedding_weight.shape[0]
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(21))
    labels[[0, 5, 11]] = -100
    m = lens_metrics(decoder, x, target, labels)
    assert int(m["n_tokens"]) == n and int(m["n_labels"]) == n - 3
    torch.testing.assert_close(
        m["kl"].float() / n, reference_kl(decoder, x, target), rtol=1e-5, atol=1e-6
    )
    logits = decoder.decode(x)  # (L, N, V), soft-capped as the model does
    for layer in range(LAYERS):
        expected = F.cross_entropy(logits[layer], labels, ignore_index=-100, reduction="sum")
        torch.testing.assert_close(m["ce"][layer].float(), expected, rtol=1e-5, atol=1e-4)
    assert (m["ce"] > 0).all()


def test_lens_metrics_without_labels(llama_decoder):
    x = llama_decoder.normalize(residuals(22))
    m = lens_metrics(llama_decoder, x, _target(llama_decoder, 23))
    assert int(m["n_labels"]) == 0 and (m["ce"] == 0).all()
    assert (m["kl"] > 0).all()


# --- artifacts ------------------------------------------------------------------------------------


def _save(lens, path, llama_decoder, **overrides):
    kwargs = dict(
        base_model="tiny-llama",
        revision="local",
        unembed_hash=tensor_fingerprint(llama_decoder.unembedding_weight),
        num_hidden_layers=LAYERS,
    )
    kwargs.update(overrides)
    return save_lens(lens, path, **kwargs)


@pytest.mark.parametrize("bias", [True, False])
def test_artifact_round_trip(tmp_path, llama_decoder, bias):
    lens = random_tuned_lens(24, bias=bias)
    lens.offset = 2
    path = _save(lens, tmp_path / "lens", llama_decoder)
    config = read_config(path)
    for key in (
        "base_model_name_or_path",
        "base_model_revision",
        "d_model",
        "num_hidden_layers",
        "bias",
        "unembed_hash",
        "lens_type",
    ):
        assert key in config, key
    assert config["lens_type"] == "tuned" and config["bias"] is bias and config["offset"] == 2
    loaded = load_lens(
        path, unembed_hash=tensor_fingerprint(llama_decoder.unembedding_weight), num_hidden_layers=LAYERS
    )
    assert isinstance(loaded, TunedLens) and loaded.layers == lens.layers and loaded.offset == 2
    assert (loaded.bias is None) == (not bias)
    h = residuals(25)
    torch.testing.assert_close(loaded(h), lens(h), rtol=0, atol=0)


def test_logit_lens_artifact_round_trip(tmp_path, llama_decoder):
    path = _save(LogitLens([0, 1, 2], D), tmp_path / "logit", llama_decoder)
    assert not (path / WEIGHTS).exists()
    loaded = load_lens(path)
    assert isinstance(loaded, LogitLens) and loaded.layers == [0, 1, 2]


@pytest.fixture
def artifact(tmp_path, llama_decoder):
    return _save(random_tuned_lens(26), tmp_path / "lens", llama_decoder)


def test_load_refuses_other_unembedding(artifact, llama_decoder):
    with pytest.raises(
        LensArtifactError, match="trained for 'tiny-llama'.*unembedding 0123456789abcdef"
    ):
        load_lens(artifact, unembed_hash="0123456789abcdef")


def test_load_refuses_other_layer_count(artifact):
    with pytest.raises(LensArtifactError, match="has 3 layers but this model has 5"):
        load_lens(artifact, num_hidden_layers=5)


def test_load_refuses_unknown_lens_type(artifact):
    config = json.loads((artifact / CONFIG).read_text())
    config["lens_type"] = "quantum"
    (artifact / CONFIG).write_text(json.dumps(config))
    with pytest.raises(LensArtifactError, match="unknown lens type 'quantum'"):
        load_lens(artifact)


def test_load_refuses_missing_weights(artifact):
    (artifact / WEIGHTS).unlink()
    with pytest.raises(LensArtifactError, match=f"no {WEIGHTS}"):
        load_lens(artifact)


def test_load_refuses_truncated_weights(artifact):
    data = (artifact / WEIGHTS).read_bytes()
    (artifact / WEIGHTS).write_bytes(data[: len(data) - 100])
    with pytest.raises(LensArtifactError, match="does not match its manifest"):
        load_lens(artifact)


def test_load_refuses_modified_weights_of_same_size(artifact):
    data = bytearray((artifact / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (artifact / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(LensArtifactError, match="does not match its manifest"):
        load_lens(artifact)


def test_load_refuses_missing_or_broken_config(tmp_path, artifact):
    with pytest.raises(LensArtifactError, match="not a lens artifact"):
        load_lens(tmp_path / "nowhere")
    (artifact / CONFIG).write_text("{not json")
    with pytest.raises(LensArtifactError, match="not valid JSON"):
        load_lens(artifact)


def test_save_over_existing_artifact_replaces_it(tmp_path, llama_decoder):
    path = tmp_path / "lens"
    _save(random_tuned_lens(27), path, llama_decoder)
    (path / "stale.txt").write_text("from the old artifact")
    newer = random_tuned_lens(28, bias=False)
    _save(newer, path, llama_decoder)
    assert sorted(os.listdir(tmp_path)) == ["lens"], "temporary or old folders left behind"
    assert sorted(os.listdir(path)) == sorted([CONFIG, WEIGHTS])
    loaded = load_lens(path)
    assert loaded.bias is None
    torch.testing.assert_close(loaded.weight, newer.weight, rtol=0, atol=0)


def test_load_refuses_a_manifest_without_weights(tmp_path):
    lens = TunedLens([0, 1], 8)
    path = save_lens(lens, tmp_path / "lens", base_model="m", revision="r", unembed_hash="h", num_hidden_layers=2)
    config = json.loads((path / "config.json").read_text())
    config["files"] = {}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensArtifactError, match="lists no lens.safetensors"):
        load_lens(path)


def test_kl_divergence_is_the_kl_with_zeros_and_nans_handled():
    from lenscope.lenses.unembed import kl_divergence

    g = torch.Generator().manual_seed(0)
    p, q = torch.log_softmax(torch.randn(4, 7, generator=g), -1), torch.log_softmax(torch.randn(4, 7, generator=g), -1)
    expected = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), expected)
    assert (kl_divergence(p, p).abs() < 1e-6).all()
    # A token the target never predicts adds nothing, even where q gives it probability 0 ...
    p0 = p.clone()
    p0[:, 0] = -float("inf")
    q0 = q.clone()
    q0[:, 0] = -float("inf")
    assert torch.isfinite(kl_divergence(torch.log_softmax(p0, -1), q0)).all()
    # ... but a NaN from a diverged lens is not read as agreement.
    q[1, 3] = float("nan")
    assert kl_divergence(p, q).isnan().tolist() == [False, True, False, False]
