"""Architecture discovery and residual reading on tiny random models of every supported family.

For each family the invariants of REFERENCE.md §1 are checked against the model itself: the
adapter's decoding of the last block's raw output reproduces the model's logits, and the reader's
residuals are the model's own ``output_hidden_states`` (all but the last, which is post-norm).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from lenscope.model.adapter import AdapterError, ArchitectureAdapter
from lenscope.model.loading import tensor_fingerprint
from lenscope.model.residuals import ResidualReader
from tests.conftest import TINY_DECODER, make_tokenizer, tiny_llama

VOCAB = 128
D = 32
LAYERS = 3
MAX_PARAMS = 100_000

_ATTN = TINY_DECODER
_IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64, **_IDS),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=2 * D,
        max_position_embeddings=64,
        **_IDS,
    ),
    "gptj": lambda: T.GPTJConfig(
        n_embd=D, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=64, **_IDS
    ),
    "llama": lambda: T.LlamaConfig(**_ATTN, **_IDS),
    "mistral": lambda: T.MistralConfig(**_ATTN, **_IDS),
    "qwen2": lambda: T.Qwen2Config(**_ATTN, **_IDS),
    "qwen3": lambda: T.Qwen3Config(**_ATTN, head_dim=8, **_IDS),
    "gemma": lambda: T.GemmaConfig(**_ATTN, head_dim=8, **_IDS),
    "gemma2": lambda: T.Gemma2Config(
        **_ATTN, head_dim=8, final_logit_softcapping=5.0, sliding_window=16, **_IDS
    ),
    # word_embed_proj_dim != hidden_size: OPT-350m style, with project_out after the final norm.
    "opt": lambda: T.OPTConfig(
        hidden_size=D,
        ffn_dim=2 * D,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        **_IDS,
    ),
    "phi3": lambda: T.Phi3Config(**_ATTN, original_max_position_embeddings=64, **_IDS),
    # Mixture of experts.
    "mixtral": lambda: T.MixtralConfig(**_ATTN, num_local_experts=4, num_experts_per_tok=2, **_IDS),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_ATTN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=16, **_IDS),
    "deepseek_v3": lambda: T.DeepseekV3Config(  # multi-head latent attention: as many kv heads as heads
        **{**_ATTN, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
        kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
        **_IDS),
    # State-space and hybrid models: a recurrent state, not a key/value cache.
    "mamba": lambda: T.MambaConfig(hidden_size=D, num_hidden_layers=LAYERS, state_size=4, expand=2, conv_kernel=4, **_IDS),
    "jamba": lambda: T.JambaConfig(**_ATTN, num_experts=2, num_experts_per_tok=1, mamba_d_state=4, mamba_expand=2,
                                   attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                   expert_layer_offset=1, use_mamba_kernels=False, **_IDS),
    # Logits scaled in the model's forward, outside any module (multiplied / divided by a setting).
    "cohere": lambda: T.CohereConfig(**_ATTN, logit_scale=0.0625, **_IDS),
    "granite": lambda: T.GraniteConfig(**_ATTN, logits_scaling=8.0, **_IDS),
    # A soft-cap under another name than Gemma-2's.
    "recurrent_gemma": lambda: T.RecurrentGemmaConfig(
        hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=2 * D, lru_width=D,
        attention_window_size=16, head_dim=8, logits_soft_cap=5.0, **_IDS),
    # Parallel attention and MLP, ALiBi, multi-query attention, and other layouts.
    "falcon": lambda: T.FalconConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     new_decoder_architecture=False, parallel_attn=True, **_IDS),
    "bloom": lambda: T.BloomConfig(hidden_size=D, n_layer=LAYERS, n_head=4, **_IDS),
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64, multi_query=True, **_IDS),
    "phi": lambda: T.PhiConfig(**{k: v for k, v in _ATTN.items() if k != "num_key_value_heads"}, **_IDS),
    "stablelm": lambda: T.StableLmConfig(**_ATTN, **_IDS),
    "olmo2": lambda: T.Olmo2Config(**_ATTN, **_IDS),
    "starcoder2": lambda: T.Starcoder2Config(**_ATTN, **_IDS),
    "codegen": lambda: T.CodeGenConfig(n_embd=D, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64, **_IDS),
    "gemma3": lambda: T.Gemma3TextConfig(**_ATTN, head_dim=8, sliding_window=16, **_IDS),
    "xglm": lambda: T.XGLMConfig(d_model=D, num_layers=LAYERS, attention_heads=4, ffn_dim=2 * D,
                                 max_position_embeddings=64, **_IDS),
}

HIDDEN_STATES_FROM_BLOCK_0 = {"mamba"}

# Logit transforms in the forward, and where they must be read from.
LOGIT_TRANSFORMS = {
    "gemma2": dict(softcap=5.0, logit_scale=1.0, logit_scale_source=None),
    "recurrent_gemma": dict(softcap=5.0, logit_scale=1.0, logit_scale_source=None),
    "cohere": dict(softcap=None, logit_scale=0.0625, logit_scale_source="logit_scale (multiplied by)"),
    "granite": dict(softcap=None, logit_scale=0.125, logit_scale_source="logits_scaling (divided by)"),
}

# Where the discovered pieces must be, per family (a wrong guess must not pass by luck).
EXPECTED_PATHS = {
    "gpt2": ("transformer.h", ["transformer.ln_f"]),
    "gpt_neox": ("gpt_neox.layers", ["gpt_neox.final_layer_norm"]),
    "gptj": ("transformer.h", ["transformer.ln_f"]),
    "opt": (
        "model.decoder.layers",
        ["model.decoder.final_layer_norm", "model.decoder.project_out"],
    ),
    "mamba": ("backbone.layers", ["backbone.norm_f"]),
    "falcon": ("transformer.h", ["transformer.ln_f"]),
    "bloom": ("transformer.h", ["transformer.ln_f"]),
    "gpt_bigcode": ("transformer.h", ["transformer.ln_f"]),
    "codegen": ("transformer.h", ["transformer.ln_f"]),
    "phi": ("model.layers", ["model.final_layernorm"]),
    "jamba": ("model.layers", ["model.final_layernorm"]),
    "recurrent_gemma": ("model.layers", ["model.final_norm"]),
    "xglm": ("model.layers", ["model.layer_norm"]),
}


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMS, (
        "config key misspelt: model is not tiny"
    )
    if arch in ("gemma2", "recurrent_gemma"):
        # Random init gives logits of |z| < 1, where tanh capping at 5 is almost the identity; scale
        # the head so that the soft-cap visibly changes the logits and a missing cap is caught.
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a right-padded row: the reader must pass the mask through
    return ids, mask


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_decode_and_residuals_match_model(arch, tokenizer):
    model = build(arch)
    adapter = ArchitectureAdapter.discover(model)
    assert adapter.num_layers == LAYERS
    assert adapter.d_model == D
    assert adapter.vocab_size == VOCAB
    assert adapter.head is model.get_output_embeddings()
    if arch in EXPECTED_PATHS:
        assert (adapter.block_path, adapter.post_block_paths) == EXPECTED_PATHS[arch]
    else:
        assert (adapter.block_path, adapter.post_block_paths) == ("model.layers", ["model.norm"])

    ids, mask = inputs()
    residuals = ResidualReader(model, tokenizer, adapter).read(ids, mask)
    assert residuals.shape == (LAYERS + 1, 2, 7, D)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # HF's convention is [embeddings, block 0, ..., last block after the final norm]; Mamba's list
    # starts at block 0's output instead (lenscope's index 0 is the embeddings for every family).
    hidden = out.hidden_states if arch not in HIDDEN_STATES_FROM_BLOCK_0 else (None, *out.hidden_states)
    assert len(hidden) == LAYERS + 1 + (arch in HIDDEN_STATES_FROM_BLOCK_0)
    if arch in HIDDEN_STATES_FROM_BLOCK_0:
        hidden = hidden[:-2] + hidden[-1:]  # drop the raw last block output, keep its normalised copy
        with torch.no_grad():
            assert (residuals[0] - model.get_input_embeddings()(ids)).abs().max().item() < 1e-6

    with torch.no_grad():
        decoded = adapter.decode(residuals[-1])
    assert (decoded - out.logits).abs().max().item() < 1e-4
    for i in range(1 if arch in HIDDEN_STATES_FROM_BLOCK_0 else 0, LAYERS):  # the last HF entry is post-norm
        assert (residuals[i] - hidden[i]).abs().max().item() < 1e-5, f"residual {i} differs"
    # HF's last entry is the raw last block output after everything before the head (the final
    # norm; for OPT also project_out); the reader's is the raw output itself.
    with torch.no_grad():
        assert (adapter.normalize(residuals[-1]) - hidden[-1]).abs().max().item() < 1e-5
    if len(adapter.post_block_paths) == 1:
        assert (residuals[-1] - hidden[-1]).abs().max().item() > 1e-3


def test_gemma2_softcap_is_discovered_and_applied():
    model = build("gemma2")
    adapter = ArchitectureAdapter.discover(model)
    assert adapter.softcap == 5.0
    ids, mask = inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        uncapped = adapter.head(out.hidden_states[-1])
        capped = adapter.finish_logits(uncapped)
    assert out.logits.abs().max().item() <= 5.0
    assert uncapped.abs().max().item() > 5.0, "test setup: the cap must matter"
    torch.testing.assert_close(capped, out.logits, atol=1e-5, rtol=1e-5)
    assert (uncapped - out.logits).abs().max().item() > 1.0


def test_no_softcap_for_models_without_one():
    assert ArchitectureAdapter.discover(build("gemma")).softcap is None
    assert ArchitectureAdapter.discover(build("llama")).softcap is None


@pytest.mark.parametrize("arch", list(LOGIT_TRANSFORMS))
def test_logit_transforms_in_the_forward_are_read_from_the_config(arch):
    adapter = ArchitectureAdapter.discover(build(arch))
    found = {k: getattr(adapter, k) for k in LOGIT_TRANSFORMS[arch]}
    assert found == LOGIT_TRANSFORMS[arch]


def test_a_scale_that_is_not_in_the_config_is_refused():
    model = build("cohere")
    model.logit_scale = 0.3  # the forward multiplies by this; the config still says 0.0625
    with pytest.raises(AdapterError, match="scales its logits by 0.3 after the unembedding, and no setting"):
        ArchitectureAdapter.discover(model)


def test_a_bidirectional_model_is_refused():
    """BERT with its language-modelling head, as ``AutoModelForCausalLM`` builds it: every position
    sees the whole input, so a lens of position t would read the future."""
    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=2 * D,
                          max_position_embeddings=64, **_IDS)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(AdapterError, match="BertLMHeadModel is not causal: changing the last token changed the "
                                           "outputs at earlier positions"):
        ArchitectureAdapter.discover(model)


def test_an_encoder_decoder_is_refused():
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64))
    with pytest.raises(AdapterError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        ArchitectureAdapter.discover(model)


def test_opt_project_out_follows_final_norm():
    model = build("opt")
    adapter = ArchitectureAdapter.discover(model)
    assert adapter.post_block_paths[-1] == "model.decoder.project_out"
    assert adapter.post_block_paths.index(
        "model.decoder.final_layer_norm"
    ) < adapter.post_block_paths.index("model.decoder.project_out")
    # The residual stream is wider than the head's input.
    assert adapter.d_model == D and adapter.unembedding_weight.shape == (VOCAB, 16)
    h = torch.randn(2, 3, D)
    with torch.no_grad():
        assert adapter.normalize(h).shape == (2, 3, 16)


def test_discovery_leaves_no_hooks_behind():
    model = build("llama")
    ArchitectureAdapter.discover(model)
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


def _hide_norm_functionally(model: nn.Module) -> None:
    """Make the final norm a plain function instead of a module: nothing the probe can see."""
    norm = model.model.norm
    weight, eps = norm.weight.detach().clone(), norm.variance_epsilon
    del model.model._modules["norm"]
    model.model.norm = lambda h: F.rms_norm(h, (h.shape[-1],), weight, eps)


def test_hidden_final_norm_is_refused():
    model = tiny_llama()
    _hide_norm_functionally(model)
    with pytest.raises(
        AdapterError, match="could not find the final norm.*model.layers.2.*lm_head"
    ):
        ArchitectureAdapter.discover(model)


def test_norm_applied_outside_modules_is_refused():
    """The norm module is the identity and the real norm runs in a patched forward: the probe finds
    a module where the norm should be, and the self-check must notice that decoding is wrong."""
    model = tiny_llama()
    real_norm = model.model.norm
    model.model.norm = nn.Identity()
    original_forward = model.model.forward

    def forward(self, *args, **kwargs):
        out = original_forward(*args, **kwargs)
        out.last_hidden_state = real_norm(out.last_hidden_state)
        return out

    model.model.forward = types.MethodType(forward, model.model)
    with pytest.raises(AdapterError, match="does not reproduce the model's logits"):
        ArchitectureAdapter.discover(model)


def test_model_without_output_embeddings_is_refused():
    torch.manual_seed(0)
    base = AutoModel.from_config(CONFIGS["llama"]())
    assert base.get_output_embeddings() is None
    with pytest.raises(AdapterError, match="no output embeddings"):
        ArchitectureAdapter.discover(base)


def test_tensor_fingerprint():
    w = torch.randn(8, 4)
    assert tensor_fingerprint(w) == tensor_fingerprint(w.clone())
    assert tensor_fingerprint(w) == tensor_fingerprint(w.to(torch.float64))  # float32 bytes
    changed = w.clone()
    changed[3, 2] += 1e-3
    assert tensor_fingerprint(changed) != tensor_fingerprint(w)
    assert len(tensor_fingerprint(w)) == 16
