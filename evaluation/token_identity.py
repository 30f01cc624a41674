"""The token-identity patchscope (Ghandeharioun et al. 2024): h_ℓ written at the last token of a
few-shot "repeat the token" prompt, at the same layer ℓ, and the model runs on.

Every (layer, example) pair is one row of a batched target pass through ``PatchingEngine``: the
prompt is the same for all rows, only the written state and its layer differ.
"""

from __future__ import annotations

import torch

from basemodel.patching import PatchingEngine

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


class TokenIdentityPatchscope:
    def __init__(self, engine: PatchingEngine, tokenizer, prompt: str = IDENTITY_PROMPT, rows_per_pass: int = 256):
        self.engine = engine
        self.prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
        if self.prompt_ids.numel() == 0:
            raise ValueError("the token-identity prompt tokenises to nothing")
        self.rows_per_pass = rows_per_pass

    @torch.no_grad()
    def logits(self, states: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """states: (num_layers, N, d) source states at residual indices ``layers`` → (num_layers, N, V)
        next-token logits read at the prompt's last position."""
        num_layers, n, d = states.shape
        device = states.device
        layer_of_row = torch.tensor(layers, device=device).repeat_interleave(n)
        flat = states.reshape(num_layers * n, d)
        last = self.prompt_ids.numel() - 1
        out = []
        for start in range(0, flat.shape[0], self.rows_per_pass):
            rows = slice(start, min(start + self.rows_per_pass, flat.shape[0]))
            count = rows.stop - rows.start
            ids = self.prompt_ids.to(device).expand(count, -1)
            at = torch.full((count,), last, device=device)
            out.append(self.engine.run(ids, None, layer_of_row[rows], at, flat[rows], at).float())
        return torch.cat(out).view(num_layers, n, -1)
