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
* soft-capping comes from the config (``final_logit_softcapping``).

The adapter then checks itself on that probe pass: decoding the raw output of the last block must
reproduce the model's own logits, so a wrong guess fails loudly at load time instead of silently
producing meaningless lenses (REFERENCE.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from lenses.errors import UserError


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

    def apply_softcap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Logits the model would produce if ``h`` were its last block's output. h: (..., d) → (..., V)."""
        return self.apply_softcap(self.head(self.normalize(h)))

    @classmethod
    def discover(cls, model: PreTrainedModel) -> ArchitectureAdapter:
        name = type(model).__name__
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

        post_paths, last_block_out, logits, returns_tuple = _probe(model, blocks, head, names)
        if not post_paths:
            raise AdapterError(
                f"could not find the final norm of {name}: no module runs between its last decoder "
                f"block ({block_path}.{len(blocks) - 1}) and its unembedding ({head_path})"
            )
        softcap = getattr(_text_config(model), "final_logit_softcapping", None) or None
        adapter = cls(model=model, block_path=block_path, head_path=head_path,
                      post_block_paths=post_paths, d_model=last_block_out.shape[-1], softcap=softcap,
                      block_output_is_tuple=returns_tuple)
        with torch.no_grad():
            decoded = adapter.decode(last_block_out).float()
        err = (decoded - logits.float()).abs().max().item()
        tol = 1e-3 * max(1.0, logits.float().abs().max().item())
        if model.dtype != torch.float32:
            tol *= 50
        if not err <= tol:
            raise AdapterError(
                f"decoding the last block of {name} through {' -> '.join(post_paths + [head_path])} "
                f"does not reproduce the model's logits (max abs diff {err:.3g}); the model applies "
                "something after its last block that the adapter cannot see"
            )
        return adapter


def _probe(model: PreTrainedModel, blocks: nn.ModuleList, head: nn.Module, names: dict[int, str]):
    """One forward pass on a few tokens, recording the order in which modules start and finish."""
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
        if module is last_block:
            captured["last"] = _first_tensor(output).detach()
            captured["tuple"] = isinstance(output, (tuple, list))

    for n, m in model.named_modules():
        if n:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
    try:
        vocab = head.weight.shape[0]
        device = head.weight.device
        ids = (torch.arange(5, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    block_end = ends[names[id(last_block)]]
    head_start = starts[names[id(head)]]
    inside = [n for n, s in starts.items() if s > block_end and ends.get(n, head_start + 1) < head_start]
    # Keep only the outermost modules: a norm's own submodules are not separate steps.
    outer = [n for n in inside if not any(n.startswith(o + ".") for o in inside if o != n)]
    outer.sort(key=lambda n: starts[n])
    # Dropout is the identity in eval mode and never part of how the model decodes.
    outer = [n for n in outer if not isinstance(model.get_submodule(n), nn.Dropout)]
    return outer, captured["last"], out.logits, captured["tuple"]
