"""The token-identity patchscope (Ghandeharioun et al. 2024): h_ℓ written at the last token of a
few-shot "repeat the token" prompt, at the same layer ℓ, and the model runs on.

Every (layer, example) pair is one row of a batched target pass through ``PatchingEngine``: the
prompt is the same for all rows, only the written state and its layer differ. And since the state
is written at the LAST token, under causal attention nothing before it depends on the patch: the
prompt's prefix is run once, its key/value cache shared by every row, and each row's pass covers
one token instead of the whole prompt (~20× less compute for the default prompt).
"""

from __future__ import annotations

import copy

import torch

from basemodel.patching import PatchingEngine
from lenses.errors import ConfigError

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


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
        """Key/value cache of the prompt without its last token (batch 1), or None."""
        if self._prefix_cache is None or self._prefix_cache[0] != device:
            with torch.no_grad():
                out = self.engine.adapter.model(input_ids=self.prompt_ids[:-1].to(device)[None], use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self._prefix_cache = (device, cache if hasattr(cache, "batch_repeat_interleave") else None)
            if self._prefix_cache[1] is None:
                self.reuse_prefix = False
        return self._prefix_cache[1]

    @torch.no_grad()
    def logits(self, states: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """states: (num_layers, N, d) source states at residual indices ``layers`` → (num_layers, N, V)
        next-token logits read at the prompt's last position."""
        num_layers, n, d = states.shape
        device = states.device
        layer_of_row = torch.tensor(layers, device=device).repeat_interleave(n)
        flat = states.reshape(num_layers * n, d)
        prefix = self._prefix(device) if self.reuse_prefix else None
        prompt = self.prompt_ids.to(device)
        out = []
        for start in range(0, flat.shape[0], self.rows_per_pass):
            rows = slice(start, min(start + self.rows_per_pass, flat.shape[0]))
            count = rows.stop - rows.start
            if prefix is not None:  # one token per row after the shared prefix
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(count)
                ids, mask = prompt[-1:].expand(count, 1), torch.ones(count, prompt.numel(), dtype=torch.long, device=device)
                at = torch.zeros(count, dtype=torch.long, device=device)
            else:
                cache, ids, mask = None, prompt.expand(count, -1), None
                at = torch.full((count,), prompt.numel() - 1, device=device)
            out.append(self.engine.run(ids, mask, layer_of_row[rows], at, flat[rows], at, past_key_values=cache).float())
        return torch.cat(out).view(num_layers, n, -1)
