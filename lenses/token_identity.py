"""The token-identity patchscope (Ghandeharioun et al. 2024), and the same as a lens: h_ℓ written at the last token of a
few-shot "repeat the token" prompt, at the same layer ℓ, and the model runs on.

Every (layer, example) pair is one row of a batched target pass through ``PatchingEngine``: the
prompt is the same for all rows, only the written state and its layer differ. And since the state
is written at the LAST token, under causal attention nothing before it depends on the patch: the
prompt's prefix is run once, its key/value cache shared by every row, and each row's pass covers
one token instead of the whole prompt (~20× less compute for the default prompt).

Not every model's cache can be shared that way (a state-space model's recurrent state, say, is not
a key/value cache that repeats along the batch). So before the prefix is trusted it is tried on two
rows against full passes; if that fails or disagrees, every row runs the whole prompt instead.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.learned_prompt import IDENTITY_PROMPT
from lenscope.lenses.lens import Lens
from lenscope.model.patching import PatchingEngine

if TYPE_CHECKING:
    from lenscope.model.frozen import FrozenModel


class TokenIdentityPatchscope:
    def __init__(self, engine: PatchingEngine, tokenizer, prompt: str = IDENTITY_PROMPT, rows_per_pass: int = 256,
                 reuse_prefix: bool = True):
        """
        Args:
            reuse_prefix: run the prompt's prefix once and share its key/value cache (falls back to
                full passes for a model that returns no cache).
        """
        self.engine = engine
        self.prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
        if self.prompt_ids.numel() == 0 or not prompt.strip():
            raise ConfigError(f"the token-identity prompt {prompt!r} has no token to write the state at; pass a "
                              "prompt ending in a placeholder token as --model.identity_prompt (default: "
                              f"{IDENTITY_PROMPT!r})")
        if rows_per_pass < 1:
            raise ConfigError(f"--model.rows_per_pass must be at least 1, got {rows_per_pass}")
        self.rows_per_pass = rows_per_pass
        self.reuse_prefix = reuse_prefix and self.prompt_ids.numel() > 1
        self._prefix_cache = None

    def _prefix(self, device: torch.device):
        """Key/value cache of the prompt without its last token (batch 1), or None when this
        model's cache cannot stand in for the prefix (then every row runs the whole prompt)."""
        if self._prefix_cache is None or self._prefix_cache[0] != device:
            cache = None
            try:
                with torch.no_grad():
                    out = self.engine.adapter.model(input_ids=self.prompt_ids[:-1].to(device)[None], use_cache=True)
                cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                if cache is not None and not self._prefix_agrees(cache, device):
                    cache = None
            except Exception:  # noqa: BLE001 (any failure of a cache type means: do not use it)
                cache = None
            self._prefix_cache = (device, cache)
            if cache is None:
                self.reuse_prefix = False
        return self._prefix_cache[1]

    def _prefix_agrees(self, cache, device: torch.device) -> bool:
        """Two rows (different states, different layers) through the shared prefix equal full passes."""
        adapter = self.engine.adapter
        generator = torch.Generator().manual_seed(0)
        states = torch.randn(2, adapter.d_model, generator=generator).to(device, adapter.unembedding_weight.dtype)
        layers = torch.tensor([1, adapter.num_layers // 2 + 1], device=device).clamp(max=adapter.num_layers)
        shared = self._rows(states, layers, cache)
        full = self._rows(states, layers, None)
        return bool(torch.allclose(shared.float(), full.float(), atol=1e-3, rtol=1e-3))

    def _rows(self, states: torch.Tensor, layers: torch.Tensor, prefix) -> torch.Tensor:
        """Next-token logits of the prompt with states[n] written at layer layers[n] of its last token."""
        count, device = states.shape[0], states.device
        prompt = self.prompt_ids.to(device)
        if prefix is not None:  # one token per row after the shared prefix
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(count)
            ids, mask = prompt[-1:].expand(count, 1), torch.ones(count, prompt.numel(), dtype=torch.long, device=device)
            at = torch.zeros(count, dtype=torch.long, device=device)
        else:
            cache, ids, mask = None, prompt.expand(count, -1), None
            at = torch.full((count,), prompt.numel() - 1, device=device)
        return self.engine.run(ids, mask, layers, at, states, at, past_key_values=cache)

    @torch.no_grad()
    def logits(self, states: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """states: (num_layers, N, d) source states at residual indices ``layers`` → (num_layers, N, V)
        next-token logits read at the prompt's last position."""
        num_layers, n, d = states.shape
        device = states.device
        layer_of_row = torch.tensor(layers, device=device).repeat_interleave(n)
        flat = states.reshape(num_layers * n, d)
        prefix = self._prefix(device) if self.reuse_prefix else None
        out = []
        for start in range(0, flat.shape[0], self.rows_per_pass):
            rows = slice(start, min(start + self.rows_per_pass, flat.shape[0]))
            out.append(self._rows(flat[rows], layer_of_row[rows], prefix).float())
        return torch.cat(out).view(num_layers, n, -1)


class TokenIdentityLens(Lens):
    """The token-identity patchscope as a lens: ``lens.logits(model, h)`` decodes each state by
    writing it at the identity prompt's last token, at its own layer, and reading the model's next
    token there; the prompt's prefix is shared as above. Nothing is trained, so there is no
    artifact: make one for a model, ``TokenIdentityLens.for_model(model)``, and use it wherever a
    lens goes (``lens.trajectory(model, text)``, ``Trajectory.of``, ``lenscope show --lens token_identity``)."""

    lens_type = "token_identity"

    def __init__(self, layers: list[int], d_model: int, prompt: str = IDENTITY_PROMPT, rows_per_pass: int = 256):
        super().__init__(layers, d_model)
        self.prompt = prompt
        self.rows_per_pass = rows_per_pass
        self._scope: TokenIdentityPatchscope | None = None

    @classmethod
    def for_model(cls, model: FrozenModel, prompt: str = IDENTITY_PROMPT, rows_per_pass: int = 256) -> TokenIdentityLens:
        """Every residual a lens reads of ``model`` (the embeddings and blocks 0 … L − 2)."""
        return cls(model.layers, model.d_model, prompt, rows_per_pass)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("the token-identity lens decodes through the model: call lens.logits(model, h)")

    @torch.no_grad()
    def logits(self, model: FrozenModel, h: torch.Tensor) -> torch.Tensor:
        """h: (num_layers, ..., d_model) at ``self.layers`` → (num_layers, ..., vocab) fp32 logits."""
        if self._scope is None or self._scope.engine is not model.engine:
            self._scope = TokenIdentityPatchscope(model.engine, model.tokenizer, self.prompt, self.rows_per_pass)
        shape = h.shape
        dtype = model.adapter.unembedding_weight.dtype
        flat = h.reshape(shape[0], -1, shape[-1]).to(dtype)
        return self._scope.logits(flat, self.layers).float().view(*shape[:-1], -1)
