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
checked against full passes on this model. Such a row writes its state at the one position it runs,
so the patching engine skips the blocks below the layer written (half of them on average).
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from lenscope.batching import cheapest_passes
from lenscope.errors import ConfigError
from lenscope.lenses.lens import LENS_TYPES, Lens
from lenscope.lenses.unembed import kl_divergence, logit_metrics
from lenscope.model.patching import PASS_COST_BLOCK_ROWS

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
        self._prefixes: weakref.WeakKeyDictionary[FrozenModel, tuple] = weakref.WeakKeyDictionary()
        """Model → (the prompt, the model's dtype, their prefix cache): kept between calls outside training."""

    def __getstate__(self) -> dict:
        # The caches and verdicts hold weak references (not picklable) and belong to this process's models.
        return {**super().__getstate__(), "_prefix_works": None, "_prefixes": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._prefix_works = weakref.WeakKeyDictionary()
        self._prefixes = weakref.WeakKeyDictionary()

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
        (at most ``rows_per_pass`` per forward pass); differentiable with respect to the prompt."""
        self.bind(model)  # a learned prompt means nothing to another model
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
        # pass, and every call until the prompt changes, through a copy; in training each pass runs
        # its own, of its own layers' prompts, so gradients reach the prompt.
        kept = self._kept_prefix(model) if shared and not training else None

        def run(rows: torch.Tensor) -> torch.Tensor:
            index = layer_index[rows]
            if not shared:
                return self._pass(model, index, flat[rows])
            if not training:
                return self._pass(model, index, flat[rows], copy.deepcopy(kept))
            own = index.unique()  # sorted
            return self._pass(model, index, flat[rows], self._prefix_cache(model, own), torch.searchsorted(own, index))

        # A row on the shared prefix runs the blocks from its layer on (the engine skips those below
        # the lowest layer of its pass): rows of nearby layers share a pass.
        num_blocks = model.engine.adapter.num_layers
        widths = [num_blocks - self.layers[i] if shared else num_blocks for i in range(num_layers) for _ in range(n)]
        passes = [torch.tensor(rows, device=device)
                  for rows in cheapest_passes(widths, self.rows_per_pass, PASS_COST_BLOCK_ROWS)]
        out = torch.cat([run(rows) for rows in passes])
        if training and not out.requires_grad:  # no row depends on the prompt (every one written at L)
            out = out + 0 * self.prompt.sum()
        return out[torch.cat(passes).argsort()].view(*shape[:-1], -1)  # back to layer-major order

    @torch.no_grad()
    def _kept_prefix(self, model: FrozenModel):
        """Every layer's prefix cache, computed again only when the prompt has changed (it is small:
        the prompt it was made from is kept and compared, which no in-place write can escape)."""
        prompt, dtype = self.prompt.detach(), model.engine.adapter.unembedding_weight.dtype
        kept = self._prefixes.get(model)
        fresh = (kept is not None and kept[1] == dtype and kept[0].shape == prompt.shape
                 and kept[0].device == prompt.device and torch.equal(kept[0], prompt))
        if not fresh:
            kept = self._prefixes[model] = (prompt.clone(), dtype, self._prefix_cache(model))
        return kept[2]

    def _prefix_cache(self, model: FrozenModel, layer_index: torch.Tensor | None = None):
        """The key/value cache of each layer's prompt without its last vector (batch = the layers
        of ``layer_index``, default all)."""
        prompts = self.prompt if layer_index is None else self.prompt[layer_index]
        return model.prompt_cache(inputs_embeds=prompts[:, :-1].to(model.engine.adapter.unembedding_weight.dtype))

    def _pass(self, model: FrozenModel, layer_index: torch.Tensor, states: torch.Tensor, prefix=None,
              prefix_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, V) of states[r] written at the last prompt position of layer layer_index[r]:
        over the whole prompt, or only the last position on ``prefix`` (a cache of
        :meth:`_prefix_cache`, which the pass extends; row r continues its row ``prefix_rows[r]``,
        default ``layer_index[r]``)."""
        engine = model.engine
        count, device = states.shape[0], states.device
        residual_index = torch.tensor(self.layers, device=device)[layer_index]
        dtype = engine.adapter.unembedding_weight.dtype
        if prefix is None:
            at = torch.full((count,), self.prompt_length - 1, device=device)
            return engine.run(None, None, residual_index, at, states, at,
                              inputs_embeds=self.prompt[layer_index].to(dtype)).float()
        prefix.batch_select_indices(layer_index if prefix_rows is None else prefix_rows)
        at = torch.zeros(count, dtype=torch.long, device=device)
        mask = torch.ones(count, self.prompt_length, dtype=torch.long, device=device)
        return engine.run(None, mask, residual_index, at, states, at, past_key_values=prefix,
                          inputs_embeds=self.prompt[layer_index, -1:].to(dtype)).float()

    @torch.no_grad()
    def _shares_prefix(self, model: FrozenModel) -> bool:
        """Whether the rows run only the prompt's last position on a cache of the rest: where the
        prompt has more than one vector and this model's cache gives what full passes give
        (checked once per model on two rows of different states: once from the first layer, once
        from a higher one, whose pass skips the blocks below as the engine does)."""
        if not self.share_prefix or self.prompt_length < 2:
            return False
        if model not in self._prefix_works:
            generator = torch.Generator().manual_seed(0)
            states = torch.randn(2, self.d_model, generator=generator).to(self.prompt.device)
            last = len(self.layers) - 1
            works = True
            # Two passes: one from the first layer, and one whose lowest layer is above it, where
            # the engine skips the blocks below.
            for layers in ([0, last], [max(last // 2, min(1, last)), last]):
                layers = torch.tensor(layers, device=self.prompt.device)
                try:
                    cache = self._prefix_cache(model)
                    works = works and cache is not None and torch.allclose(
                        self._pass(model, layers, states, cache), self._pass(model, layers, states), atol=1e-3, rtol=1e-3)
                except Exception:  # noqa: BLE001 (any failure of a cache type means: do not use it)
                    works = False
            self._prefix_works[model] = works
        return self._prefix_works[model]


LENS_TYPES[LearnedPromptLens.lens_type] = LearnedPromptLens
