"""The learned-prompt future lens (Future Lens, Pal et al. 2023, method (c)).

A trainable soft prompt of ``prompt_length`` vectors per lensed layer is fed to the frozen model
as input embeddings; the state h_ℓ(t) is written at the prompt's LAST position at the same layer
ℓ, the model runs on, and its next-token distribution there is trained (KL) towards the model's
real distribution at t + offset. Only the prompt is trained.

It is a patchscope whose target prompt is learned, so it runs through the same batched
``PatchingEngine`` as the token-identity patchscope: one target pass evaluates every (layer,
example) pair of a batch. Unlike the affine lenses it needs the model to decode, so ``forward``
(residual → residual) does not exist; ``logits(model, h)`` does.

The prompt's first ``prompt_length − 1`` vectors are the same for every state of a layer: they run
once per layer, and each (layer, state) row runs only the last position on their key/value cache
(~10× less compute for a 10-vector prompt, in training as in evaluation), once that has been
checked against full passes on this model.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from lenscope.errors import ConfigError
from lenscope.lenses.lens import LENS_TYPES, Lens
from lenscope.lenses.unembed import kl_divergence, logit_metrics

if TYPE_CHECKING:
    from lenscope.model.frozen import FrozenModel

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
"""The few-shot identity prompt of Patchscopes: the token-identity patchscope's target prompt, and
where a learned prompt starts."""


class LearnedPromptLens(Lens):
    lens_type = "learned_prompt"

    def __init__(self, layers: list[int], d_model: int, offset: int = 1, prompt_length: int = 10):
        super().__init__(layers, d_model)
        if offset < 0 or prompt_length < 1:
            raise ValueError(f"need offset >= 0 and prompt_length >= 1, got {offset} and {prompt_length}")
        self.offset = offset
        self.prompt_length = prompt_length
        self.rows_per_pass = 4096
        """(layer, state) pairs per patched forward pass of ``logits`` (memory, not results)."""
        self.prompt = nn.Parameter(torch.zeros(len(layers), prompt_length, d_model))
        self.share_prefix = True
        """Run every layer's prompt prefix once per pass (False: every row over the whole prompt)."""
        self._prefix_works: weakref.WeakKeyDictionary[FrozenModel, bool] = weakref.WeakKeyDictionary()
        """Model → whether its key/value cache can stand in for the prompt's prefix."""

    def __getstate__(self) -> dict:
        # The cache verdicts hold weak references (not picklable) and belong to this process's models.
        return {**super().__getstate__(), "_prefix_works": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._prefix_works = weakref.WeakKeyDictionary()

    def extra_config(self) -> dict:
        return {"offset": self.offset, "prompt_length": self.prompt_length}

    @torch.no_grad()
    def init_from_tokens(self, embedding: nn.Embedding, token_ids: list[int]) -> None:
        """Start every layer's prompt from the embeddings of ``token_ids`` (cycled to the length)."""
        ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(self.prompt_length)],
                           device=embedding.weight.device)
        self.prompt.copy_(embedding(ids).to(self.prompt).expand_as(self.prompt))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a learned-prompt lens decodes through the model: call lens.logits(model, h)")

    def head_inputs(self, model: FrozenModel, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise TypeError("a learned-prompt lens decodes through the model: call lens.logits(model, h)")

    def kl(self, model: FrozenModel, h: torch.Tensor, target_logp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return kl_divergence(target_logp, torch.log_softmax(self.logits(model, h), -1)).mean(-1)

    def metrics(self, model: FrozenModel, h: torch.Tensor, target_logp: torch.Tensor, labels: torch.Tensor,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return logit_metrics(self.logits(model, h), target_logp, labels)

    def logits(self, model: FrozenModel, h: torch.Tensor) -> torch.Tensor:
        """h: (num_layers, ..., d) source states at this lens's layers → (num_layers, ..., V) logits
        at the prompt's last position, each state patched into the model running on the prompt
        (``rows_per_pass`` per forward pass); differentiable with respect to the prompt."""
        width = model.hf.get_input_embeddings().embedding_dim
        if width != self.d_model:
            raise ConfigError(f"this model's input embeddings have width {width}, its residual stream {self.d_model} "
                              "(it projects its embeddings, as some OPT models do); a learned prompt needs the two "
                              "equal: use another lens for this model")
        shape = h.shape
        h = h.reshape(shape[0], -1, shape[-1])
        num_layers, n, d = h.shape
        device = h.device
        if n == 0:  # no read position in the batch has its target k tokens ahead read too
            return torch.zeros(*shape[:-1], model.engine.adapter.vocab_size, device=device)
        layer_index = torch.arange(num_layers, device=device).repeat_interleave(n)
        flat = h.reshape(num_layers * n, d)
        shared = self._shares_prefix(model)
        training = torch.is_grad_enabled() and self.prompt.requires_grad
        # Each pass extends the cache it is given. Outside training one prefix pass serves every
        # chunk through a copy; in training each chunk runs its own, so gradients reach the prompt.
        kept = self._prefix_cache(model) if shared and not training else None

        def prefix():
            if not shared:
                return None
            return self._prefix_cache(model) if training else copy.deepcopy(kept)

        out = [self._pass(model, layer_index[start:start + self.rows_per_pass], flat[start:start + self.rows_per_pass],
                          prefix()) for start in range(0, flat.shape[0], self.rows_per_pass)]
        return torch.cat(out).view(*shape[:-1], -1)

    def _prefix_cache(self, model: FrozenModel):
        """The key/value cache of every layer's prompt without its last vector (batch = layers)."""
        return model.prompt_cache(inputs_embeds=self.prompt[:, :-1].to(model.engine.adapter.unembedding_weight.dtype))

    def _pass(self, model: FrozenModel, layer_index: torch.Tensor, states: torch.Tensor, prefix=None) -> torch.Tensor:
        """Logits (rows, V) of states[r] written at the last prompt position of layer layer_index[r]:
        over the whole prompt, or only the last position on ``prefix`` (a cache of
        :meth:`_prefix_cache`, which the pass extends)."""
        engine = model.engine
        count, device = states.shape[0], states.device
        residual_index = torch.tensor(self.layers, device=device)[layer_index]
        dtype = engine.adapter.unembedding_weight.dtype
        if prefix is None:
            at = torch.full((count,), self.prompt_length - 1, device=device)
            return engine.run(None, None, residual_index, at, states, at,
                              inputs_embeds=self.prompt[layer_index].to(dtype)).float()
        prefix.batch_select_indices(layer_index)
        at = torch.zeros(count, dtype=torch.long, device=device)
        mask = torch.ones(count, self.prompt_length, dtype=torch.long, device=device)
        return engine.run(None, mask, residual_index, at, states, at, past_key_values=prefix,
                          inputs_embeds=self.prompt[layer_index, -1:].to(dtype)).float()

    @torch.no_grad()
    def _shares_prefix(self, model: FrozenModel) -> bool:
        """Whether the rows run only the prompt's last position on a cache of the rest: where the
        prompt has more than one vector and this model's cache gives what full passes give
        (checked once per model on two rows: different states, different layers)."""
        if not self.share_prefix or self.prompt_length < 2:
            return False
        if model not in self._prefix_works:
            generator = torch.Generator().manual_seed(0)
            states = torch.randn(2, self.d_model, generator=generator).to(self.prompt.device)
            layers = torch.tensor([0, len(self.layers) - 1], device=self.prompt.device)
            try:
                cache = self._prefix_cache(model)
                works = cache is not None and torch.allclose(self._pass(model, layers, states, cache),
                                                             self._pass(model, layers, states), atol=1e-3, rtol=1e-3)
            except Exception:  # noqa: BLE001 (any failure of a cache type means: do not use it)
                works = False
            self._prefix_works[model] = works
        return self._prefix_works[model]


LENS_TYPES[LearnedPromptLens.lens_type] = LearnedPromptLens
