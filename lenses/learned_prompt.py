"""The learned-prompt future lens (Future Lens, Pal et al. 2023, method (c)).

A trainable soft prompt of ``prompt_length`` vectors per lensed layer is fed to the frozen model
as input embeddings; the state h_ℓ(t) is written at the prompt's LAST position at the same layer
ℓ, the model runs on, and its next-token distribution there is trained (KL) towards the model's
real distribution at t + offset. Only the prompt is trained.

It is a patchscope whose target prompt is learned, so it runs through the same batched
``PatchingEngine`` as the token-identity patchscope: one target pass evaluates every (layer,
example) pair of a batch. Unlike the affine lenses it needs the model to decode, so ``forward``
(residual → residual) does not exist; ``logits(model, h)`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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
        shape = h.shape
        h = h.reshape(shape[0], -1, shape[-1])
        num_layers, n, d = h.shape
        device = h.device
        engine = model.engine
        if n == 0:  # no read position in the batch has its target k tokens ahead read too
            return torch.zeros(*shape[:-1], engine.adapter.vocab_size, device=device)
        layer_index = torch.arange(num_layers, device=device).repeat_interleave(n)
        residual_index = torch.tensor(self.layers, device=device)[layer_index]
        flat = h.reshape(num_layers * n, d)
        last = self.prompt_length - 1
        out = []
        for start in range(0, flat.shape[0], self.rows_per_pass):
            rows = slice(start, min(start + self.rows_per_pass, flat.shape[0]))
            count = rows.stop - rows.start
            at = torch.full((count,), last, device=device)
            embeds = self.prompt[layer_index[rows]].to(engine.adapter.unembedding_weight.dtype)
            out.append(engine.run(None, None, residual_index[rows], at, flat[rows], at, inputs_embeds=embeds).float())
        return torch.cat(out).view(*shape[:-1], -1)


LENS_TYPES[LearnedPromptLens.lens_type] = LearnedPromptLens
