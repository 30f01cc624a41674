"""The frozen base model, as every part of lenscope sees it: one object that loads the model and
answers what lenses need from it.

    model = FrozenModel.load("embedded:smollm2-135m")      # lenscope.load_model(...)
    h = model.residuals(model.tokenize("The capital of France is"))   # (L+1, 1, T, d_model)
    logits = model.decode(h[-1])                             # the model's own decoding of a state

Training, evaluation and the benchmarks all build their model this way, so the architecture
adapter, the nnsight reader, the patching engine and the unembedding fingerprint are made once,
the same way, for every use.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lenscope.model.adapter import ArchitectureAdapter
from lenscope.model.heads import AttentionHeads
from lenscope.model.loading import (
    EMBEDDED_MODEL,
    BaseModelSettings,
    LoadedModel,
    context_length,
    load_base_model,
    tensor_fingerprint,
)
from lenscope.model.patching import PatchingEngine, cache_argument
from lenscope.model.residuals import ResidualReader


class FrozenModel:
    """A causal LM with frozen weights in eval mode, and what lenses read from and decode with.

    Residual indices: 0 is the embeddings (the input to block 0), i + 1 the output of block i; lenses
    cover ``0 .. num_layers - 1`` (the last block's output is the model's own).
    """

    def __init__(self, loaded: LoadedModel):
        self.hf: PreTrainedModel = loaded.model
        """The Hugging Face model itself."""
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        self.name = loaded.name
        """What was asked for: a hub id, a folder, or ``embedded:smollm2-135m``."""
        self.revision = loaded.revision
        """Hub commit, the embedded model's package version, or ``local``."""
        self.adapter = ArchitectureAdapter.discover(self.hf)
        self.reader = ResidualReader(self.hf, self.tokenizer, self.adapter)
        self.engine = PatchingEngine(self.reader)
        self.unembed_hash = tensor_fingerprint(self.adapter.unembedding_weight)
        """Fingerprint of the unembedding: a lens records it and is refused by another model."""

    @classmethod
    def load(cls, name: str | BaseModelSettings = EMBEDDED_MODEL, revision: str | None = None,
             dtype: str | torch.dtype = "float32") -> FrozenModel:
        """Load a causal LM by hub id (``EleutherAI/pythia-160m``), folder, or ``embedded:smollm2-135m``
        (or as ``BaseModelSettings`` say); anything lenscope cannot decode exactly is refused in one
        line (``ModelLoadError``, ``AdapterError``)."""
        if isinstance(name, BaseModelSettings):
            name, revision, dtype = name.name, name.revision, name.dtype
        return cls(load_base_model(name, revision, dtype))

    @property
    def num_layers(self) -> int:
        """Number of lensed residuals (= decoder blocks): indices ``0 .. num_layers - 1``."""
        return self.adapter.num_layers

    @property
    def layers(self) -> list[int]:
        """The residual indices a lens covers."""
        return list(range(self.num_layers))

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    @property
    def context_length(self) -> int | None:
        """The longest input the model takes (None when its config does not say)."""
        return context_length(self.hf)

    @property
    def device(self) -> torch.device:
        return self.adapter.unembedding_weight.device

    def tokenize(self, text: str) -> torch.Tensor:
        """``text`` → input ids of shape (1, T) on the model's device."""
        return self.tokenizer(text, return_tensors="pt").input_ids.to(self.device)

    def residuals(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream at every block boundary: (num_layers + 1, batch, seq, d_model)."""
        return self.reader.read(input_ids, attention_mask)

    def right_padded(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists of different lengths as one right-padded batch: (input_ids, attention_mask),
        both (batch, longest); a list's positions are as if it ran alone (causal attention never
        sees the padding after them)."""
        width = max(len(ids) for ids in token_lists)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in token_lists], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in token_lists], device=self.device)
        return input_ids, mask

    def residuals_of(self, token_lists: list[list[int]]) -> torch.Tensor:
        """The residual stream of several token lists of different lengths, right-padded into one
        batch (:meth:`right_padded`): (num_layers + 1, batch, longest, d_model)."""
        return self.residuals(*self.right_padded(token_lists))

    def prompt_cache(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None):
        """The key/value cache of one unpatched pass over ``input_ids`` (batch, T), or over prompts
        given as embeddings (batch, T, d_model), for rows that continue it; None when the model
        returns none. Differentiable with respect to ``inputs_embeds`` when they require grad (a
        learned prompt in training), otherwise without autograd."""
        inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        differentiable = inputs_embeds is not None and inputs_embeds.requires_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(differentiable):
            out = self.hf(**inputs, use_cache=True)
        return getattr(out, cache_argument(self.hf), None) or getattr(out, "past_key_values", None)

    @property
    def heads(self) -> AttentionHeads:
        """Where every block's attention heads are (found on first use; ``HeadsError`` where the
        model has none)."""
        return self.engine.heads

    def head_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     layers: list[int] | None = None) -> torch.Tensor:
        """Every attention head's output (the input of the attention output projection, split by
        head): (len(layers), batch, seq, num_heads, head_dim); ``layers`` are block indices (default:
        every block with attention)."""
        return self.engine.head_outputs(input_ids, attention_mask, layers)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_model) → (..., vocab) logits, exactly as the model decodes its last residual
        (final norm, unembedding, and any soft-cap or scale the family applies)."""
        return self.adapter.decode(h)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_model) → (..., vocab) fp32 log-probabilities of :meth:`decode`."""
        return self.adapter.log_probs(h)

    def patch(self, *args, **kwargs) -> torch.Tensor:
        """Patched next-token logits: states written at (layer, position) of target prompts, many
        per forward pass (see :meth:`lenscope.model.patching.PatchingEngine.run`)."""
        return self.engine.run(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"FrozenModel({self.name!r}, revision={self.revision!r}, layers={self.num_layers}, "
                f"d_model={self.d_model}, vocab={self.vocab_size})")
