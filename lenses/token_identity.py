"""The token-identity patchscope (Ghandeharioun et al. 2024), and the same as a lens: h_ℓ written at the last token of a
few-shot "repeat the token" prompt, at the same layer ℓ, and the model runs on.

It is one instance of ``lenscope.lenses.patchscope.Patchscope`` (target = the identity prompt, same
layer, the last token): every (layer, example) pair is one row of a batched target pass, and since
the state is written at the LAST token, the prompt's prefix runs once and its key/value cache serves
every row (~20× less compute for the default prompt), once it has been checked against full passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lenscope.errors import ConfigError
from lenscope.lenses.learned_prompt import IDENTITY_PROMPT
from lenscope.lenses.lens import Lens
from lenscope.lenses.patchscope import Patchscope, Target

if TYPE_CHECKING:
    from lenscope.model.frozen import FrozenModel


def token_identity(prompt: str = IDENTITY_PROMPT, rows_per_pass: int = 256, share_prefix: bool = True) -> Patchscope:
    """The token-identity patchscope: ``.patch(model, states, layers).logits`` decodes states
    (num_layers, N, d) at residual indices ``layers`` into (num_layers, N, vocab) logits."""
    if not prompt.strip():
        raise ConfigError(f"the token-identity prompt {prompt!r} has no token to write the state at; pass a "
                          "prompt ending in a placeholder token as --model.identity_prompt (default: "
                          f"{IDENTITY_PROMPT!r})")
    return Patchscope(target=Target(prompt, layers="same"), rows_per_pass=rows_per_pass, share_prefix=share_prefix)


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
        self._scope = token_identity(prompt, rows_per_pass)

    @property
    def rows_per_pass(self) -> int:
        """(layer, state) rows per patched forward pass: the patchscope's own setting."""
        return self._scope.rows_per_pass

    @rows_per_pass.setter
    def rows_per_pass(self, value: int) -> None:
        self._scope.rows_per_pass = value

    @classmethod
    def for_model(cls, model: FrozenModel, prompt: str = IDENTITY_PROMPT, rows_per_pass: int = 256) -> TokenIdentityLens:
        """Every residual a lens reads of ``model`` (the embeddings and blocks 0 … L − 2)."""
        return cls(model.layers, model.d_model, prompt, rows_per_pass)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("the token-identity lens decodes through the model: call lens.logits(model, h)")

    @torch.no_grad()
    def logits(self, model: FrozenModel, h: torch.Tensor) -> torch.Tensor:
        """h: (num_layers, ..., d_model) at ``self.layers`` → (num_layers, ..., vocab) fp32 logits."""
        shape = h.shape
        flat = h.reshape(shape[0], -1, shape[-1])
        return self._scope.patch(model, flat, self.layers).logits.view(*shape[:-1], -1)
