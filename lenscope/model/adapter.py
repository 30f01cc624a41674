"""Find, in any Hugging Face causal LM, the pieces a lens needs.

A lens reads the residual stream after each decoder block and decodes it the way the model
decodes its last block: ``head(final_norm(h))`` plus whatever else runs between the last block and
the head (OPT's ``project_out``, Gemma-2's logit soft-capping). Rather than a hand-kept table of
architectures, the adapter discovers these pieces:

* the unembedding is ``model.get_output_embeddings()``;
* the decoder blocks are the ``nn.ModuleList`` with one entry per layer (the largest one if
  several match);
* the final norm (and anything else applied after the blocks) is found by running the model once
  on a few tokens with hooks: every outermost module that starts after the last block finished and
  before the unembedding started;
* what some families do to the logits in their ``forward``, outside any module, comes from the
  config: a final soft-cap (Gemma-2's ``final_logit_softcapping``, RecurrentGemma's
  ``logits_soft_cap``) and a constant scale (Cohere multiplies by ``logit_scale``, Granite divides by
  ``logits_scaling``, others multiply by a setting of the same name). The scale is measured on the
  probe pass and must equal a number in the config (or its reciprocal): the config says what it
  is, the probe says which way round it is applied.

The adapter then checks itself on that probe pass: decoding the raw output of the last block must
reproduce the model's own logits, so a wrong guess fails loudly at load time instead of silently
producing meaningless lenses (REFERENCE.md §1). A second pass with the last token changed must
leave every earlier position's logits as they were: a lens reads a causal model, and a
bidirectional encoder given a language-modelling head (BERT as ``AutoModelForCausalLM``) is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from lenscope.errors import UserError


class AdapterError(UserError):
    """The model's structure could not be discovered; the message names what is missing."""


def _text_config(model: PreTrainedModel):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _num_layers(model: PreTrainedModel) -> int | None:
    config = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _first_tensor(x):
    """Block outputs are a tensor or a tuple whose first entry is the hidden state."""
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass
class ArchitectureAdapter:
    """Where the blocks, the final norm and the unembedding of one model live."""

    model: PreTrainedModel
    block_path: str
    """Dotted path of the ``ModuleList`` of decoder blocks, e.g. ``model.layers``."""
    head_path: str
    post_block_paths: list[str]
    """Modules applied, in order, between the last block and the head (the final norm first)."""
    d_model: int
    """Width of the residual stream (can differ from the head's input width, e.g. OPT-350m)."""
    softcap: float | None = None
    """Final logit soft-cap: logits = cap · tanh(logits / cap)."""
    logit_scale: float = 1.0
    """Constant the model's forward multiplies its logits by (before any soft-cap)."""
    logit_scale_source: str | None = None
    """Where ``logit_scale`` comes from, e.g. ``logits_scaling (divided by)``."""
    block_output_is_tuple: bool = False
    """Whether a decoder block returns a tuple (hidden state first) rather than a tensor."""
    blocks: nn.ModuleList = field(init=False, repr=False)
    head: nn.Module = field(init=False, repr=False)
    post_blocks: list[nn.Module] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.blocks = self.model.get_submodule(self.block_path)
        self.head = self.model.get_submodule(self.head_path)
        self.post_blocks = [self.model.get_submodule(p) for p in self.post_block_paths]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    @property
    def unembedding_weight(self) -> torch.Tensor:
        """(vocab, d_model) weight of the head."""
        return self.head.weight

    @property
    def unembedding_bias(self) -> torch.Tensor | None:
        return getattr(self.head, "bias", None)

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Apply everything between the last block and the head. h: (..., d_model)."""
        for module in self.post_blocks:
            h = _first_tensor(module(h))
        return h

    def finish_logits(self, z: torch.Tensor) -> torch.Tensor:
        """What the model's forward does to the head's output z: the scale, then the soft-cap."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Logits the model would produce if ``h`` were its last block's output. h: (..., d) → (..., V)."""
        return self.finish_logits(self.head(self.normalize(h)))

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 log-probabilities of :meth:`decode`. h: (..., d) → (..., V)."""
        return torch.log_softmax(self.decode(h).float(), dim=-1)

    @classmethod
    def discover(cls, model: PreTrainedModel) -> ArchitectureAdapter:
        name = type(model).__name__
        config = _text_config(model)
        if getattr(config, "is_encoder_decoder", False):
            raise AdapterError(f"{name} is an encoder-decoder model; lenscope reads decoder-only causal language models")
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise AdapterError(f"{name} has no output embeddings (get_output_embeddings() is None); it is not a causal LM with a vocabulary head")
        names = {id(m): n for n, m in model.named_modules()}
        head_path = names[id(head)]

        n_layers = _num_layers(model)
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        matching = [(n, m) for n, m in lists if len(m) == n_layers] or lists
        if not matching:
            raise AdapterError(f"could not find the decoder blocks of {name}: it has no nn.ModuleList of {n_layers} layers")
        block_path, blocks = max(matching, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))

        probe = _probe(model, blocks, head, names)
        if not (torch.isfinite(probe.logits).all() and torch.isfinite(probe.changed_logits).all()):
            raise AdapterError(
                f"{name} gives NaN or inf logits on a 5-token probe; with float16 weights this is overflow: "
                "load it in float32 or bfloat16 (--model.base.dtype)"
            )
        if not probe.post_paths:
            raise AdapterError(
                f"could not find the final norm of {name}: no module runs between its last decoder "
                f"block ({block_path}.{len(blocks) - 1}) and its unembedding ({head_path})"
            )
        adapter = cls(model=model, block_path=block_path, head_path=head_path, post_block_paths=probe.post_paths,
                      d_model=probe.last_block_out.shape[-1], softcap=_softcap(config),
                      block_output_is_tuple=probe.returns_tuple)
        tol = 1e-3 * max(1.0, probe.logits.float().abs().max().item())
        if model.dtype != torch.float32:
            tol *= 50
        with torch.no_grad():
            z = adapter.head(adapter.normalize(probe.last_block_out))
        adapter.logit_scale, adapter.logit_scale_source = _logit_scale(name, config, z, probe.logits, adapter.softcap)
        with torch.no_grad():
            decoded = adapter.finish_logits(z).float()
        err = (decoded - probe.logits.float()).abs().max().item()
        if not err <= tol:
            raise AdapterError(
                f"decoding the last block of {name} through {' -> '.join(probe.post_paths + [head_path])} "
                f"does not reproduce the model's logits (max abs diff {err:.3g}); the model applies "
                "something after its last block that the adapter cannot see"
            )
        # Under a causal mask the earlier positions compute exactly the same numbers (masked scores
        # contribute exp(-inf) = 0): anything beyond rounding is a leak from the later token.
        leak = (probe.logits[:, :-1].float() - probe.changed_logits[:, :-1].float()).abs().max().item()
        if not leak <= tol * 1e-2:
            raise AdapterError(
                f"{name} is not causal: changing the last token changed the outputs at earlier positions "
                f"(max abs diff {leak:.3g}); lenscope reads causal language models, where position t sees only "
                "tokens up to t (a bidirectional encoder with a language-modelling head is not one)"
            )
        return adapter


_FINAL_SOFTCAP = re.compile(r"^(final_)?logits?_soft_?cap(ping)?$|^softcap$")
"""Config keys of a final logit soft-cap (not ``attn_logit_softcapping``, which caps attention)."""


def _softcap(config) -> float | None:
    for key, value in config.to_dict().items():
        if _FINAL_SOFTCAP.match(key) and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def _logit_scale(name: str, config, z: torch.Tensor, logits: torch.Tensor, softcap: float | None) -> tuple[float, str | None]:
    """The constant the model multiplies the head's output z by, read from its config.

    Measured on the probe (least squares of the logits, before any soft-cap, on z), then matched to
    a number in the config or its reciprocal: the exact value comes from the config.
    """
    z, target = z.double().flatten(), logits.double().flatten()
    if softcap:
        inside = target.abs() < 0.99 * softcap  # where tanh can be undone accurately
        z, target = z[inside], torch.atanh(target[inside] / softcap) * softcap
    if z.numel() == 0 or float(z @ z) == 0:
        return 1.0, None
    measured = float(z @ target / (z @ z))
    tol = 1e-3 * max(1.0, float(target.abs().max()))
    if abs(measured - 1.0) <= 1e-3 or not float((measured * z - target).abs().max()) <= tol:
        return 1.0, None  # no scale, or not a constant one: the decoding check says what it sees
    for key, value in config.to_dict().items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            for factor, how in ((float(value), "multiplied by"), (1.0 / value, "divided by")):
                if abs(factor - measured) <= 1e-3 * abs(measured):
                    return factor, f"{key} ({how})"
    raise AdapterError(
        f"{name} scales its logits by {measured:.4g} after the unembedding, and no setting in its config has that "
        "value; the adapter cannot reproduce the model's own decoding"
    )


@dataclass
class _Probe:
    post_paths: list[str]
    last_block_out: torch.Tensor
    logits: torch.Tensor
    changed_logits: torch.Tensor
    """The logits of the same tokens with the last one changed (the causality check)."""
    returns_tuple: bool


def _probe(model: PreTrainedModel, blocks: nn.ModuleList, head: nn.Module, names: dict[int, str]) -> _Probe:
    """Forward passes on a few tokens: the order in which modules start and finish, then the same
    tokens with the last one changed."""
    clock = iter(range(1_000_000))
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    captured: dict[str, torch.Tensor] = {}
    last_block = blocks[-1]
    handles = []

    def pre_hook(module, args):
        starts.setdefault(names[id(module)], next(clock))

    def post_hook(module, args, output):
        ends[names[id(module)]] = next(clock)
        if module is last_block and "last" not in captured:
            captured["last"] = _first_tensor(output).detach()
            captured["tuple"] = isinstance(output, (tuple, list))

    for n, m in model.named_modules():
        if n:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = (torch.arange(5, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    changed = ids.clone()
    changed[0, -1] = ids[0, 0]  # another of the probe's own tokens
    with torch.no_grad():
        changed_out = model(input_ids=changed, attention_mask=torch.ones_like(changed), use_cache=False)
    block_end = ends[names[id(last_block)]]
    head_start = starts[names[id(head)]]
    inside = [n for n, s in starts.items() if s > block_end and ends.get(n, head_start + 1) < head_start]
    # Keep only the outermost modules: a norm's own submodules are not separate steps.
    outer = [n for n in inside if not any(n.startswith(o + ".") for o in inside if o != n)]
    outer.sort(key=lambda n: starts[n])
    # Dropout is the identity in eval mode and never part of how the model decodes.
    outer = [n for n in outer if not isinstance(model.get_submodule(n), nn.Dropout)]
    return _Probe(outer, captured["last"], out.logits, changed_out.logits, captured["tuple"])
