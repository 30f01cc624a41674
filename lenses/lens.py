"""Lenses as plain ``nn.Module``s: no Lightning, usable in a notebook.

A lens maps the residual stream at each lensed layer to a vector that the model's own decoder
(final norm + unembedding, see ``lenscope.model.adapter.ArchitectureAdapter``) turns into next-token logits. The lens
holds only its own parameters; the frozen model's norm and head are never part of its state, so a
lens checkpoint or artifact never contains base-model weights.

Residual indices follow REFERENCE.md: 0 = embeddings (input to block 0), i+1 = output of block i.
Like the reference tuned lens, we lens indices 0..L-1 (the embeddings and blocks 0..L-2); the last
block's output is the model's own output and needs no translator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lenscope.errors import UserError
from lenscope.lenses.unembed import lens_kl, lens_metrics

if TYPE_CHECKING:
    from collections.abc import Callable

    from lenscope.lenses.trajectory import Trajectory
    from lenscope.model.frozen import FrozenModel


def residual_name(index: int) -> str:
    """What residual ``index`` is: 0 the embeddings, i + 1 the output of block i."""
    return "embeddings" if index == 0 else f"block {index - 1}"


def lens_key(lens_type: str, offset: int) -> str:
    """Name of a lens within a run: its type, with ``+k`` for a future lens of offset k ≥ 1."""
    return lens_type if offset == 0 else f"{lens_type}+{offset}"


class WrongModelError(UserError):
    """A lens was used with a model other than the one it was made for."""


class Lens(nn.Module):
    """Base class: ``logits(model, h)`` decodes the residuals of the lensed layers, whatever the
    kind of lens; for the affine kinds ``forward(h)`` maps them to decodable residuals first.

    A lens with learned parameters is bound to one model, by the fingerprint of its unembedding
    (``unembed_hash``): a loaded lens is bound to the model its artifact names, a new one to the
    first model it is used with, and every use with a model (``logits``, ``head_inputs`` and what
    builds on them, ``Trajectory.of``) refuses another model in one line (``bind``).
    """

    lens_type: str = "abstract"
    offset: int = 0
    """How many tokens ahead the lens predicts: 0 for the next token, k for the token k + 1 ahead."""

    def __init__(self, layers: list[int], d_model: int):
        super().__init__()
        self.layers = list(layers)
        self.d_model = d_model
        self.unembed_hash: str | None = None
        """Fingerprint of the unembedding of the model this lens was made for (None: not bound yet)."""
        self.made_for: str | None = None
        """The name of that model, for messages."""
        self.check_first_model: Callable[[FrozenModel], None] | None = None
        """Run on the model this lens is bound to when it was not bound yet: a lens in the tuned-lens
        format names its model by tuned-lens's own fingerprint, which only warns (as tuned-lens does)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def key(self) -> str:
        """The lens's name within a run or a results table: ``tuned``, ``tuned+2``, ..."""
        return lens_key(self.lens_type, self.offset)

    def bind(self, model: FrozenModel) -> None:
        """Refuse ``model`` in one line unless this lens, and every lens it wraps (a lens asked as a
        patchscope), was made for it; a lens not bound yet is bound to it (``bind_lenses``)."""
        bind_lenses([self], model)

    def trajectory(self, model: FrozenModel, text: str, k: int = 5, baseline: bool = True) -> Trajectory:
        """What every layer predicts at every token of ``text`` under this lens (beside the logit
        lens unless ``baseline`` is False): ``.to_html(path)``, ``.to_png(path)``, ``print(...)``."""
        from lenscope.lenses.trajectory import Trajectory

        lenses = [self] if self.lens_type == "logit" or not baseline else [LogitLens(self.layers, self.d_model), self]
        return Trajectory.of(model, text, lenses, k)

    def logits(self, model: FrozenModel, h: torch.Tensor) -> torch.Tensor:
        """h: (num_layers, ..., d_model), the residuals at ``self.layers`` → (num_layers, ..., vocab)
        fp32 logits, decoded by ``model`` exactly as it decodes its own last residual. The lens runs in
        fp32, the decoder in the model's dtype (as ``lenscope evaluate`` scores it)."""
        self.bind(model)
        decoder_dtype = model.adapter.unembedding_weight.dtype
        return model.decode(self(h.float()).to(decoder_dtype)).float()

    def prompt_logits(self, model: FrozenModel, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``logits`` of one prompt's residuals h (num_layers, 1, T, d_model), given the prompt's
        tokens ids (1, T): a lens that writes into the prompt it reads needs them; the others decode h alone."""
        return self.logits(model, h)

    # Training and validation score a lens against the model's own distribution without forming
    # (layers × tokens × vocab) logits: the head's inputs go to the fused KL of lenscope.lenses.unembed.
    def head_inputs(self, model: FrozenModel, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """h: (num_layers, N, d_model) → the model head's inputs (through its final norm), with the
        lens's matrix products in ``dtype``."""
        self.bind(model)
        with torch.autocast(h.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model.adapter.normalize(self(h.float()))

    def kl(self, model: FrozenModel, h: torch.Tensor, target_logp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-layer mean KL(target ‖ lens) in nats, (num_layers,), differentiable with respect to the
        lens. h: (num_layers, N, d_model); target_logp: (N, vocab) fp32, the model's own log-probs."""
        return lens_kl(model.adapter, self.head_inputs(model, h, dtype), target_logp, dtype)

    def metrics(self, model: FrozenModel, h: torch.Tensor, target_logp: torch.Tensor, labels: torch.Tensor,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Per-layer sums for validation: ``kl`` and ``ce`` (nats), ``n_tokens``, ``n_labels``
        (see ``lenscope.lenses.unembed.lens_metrics``); labels (N,), -100 where there is none."""
        return lens_metrics(model.adapter, self.head_inputs(model, h, dtype), target_logp, labels, dtype)

    translates = False
    """Whether the lens maps a state to a state (``translate``): the affine kinds; the patchscope
    lenses (learned prompt, token identity) decode through the model instead."""

    def translate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h (N, d_model) at residual index ``layer`` → the state this lens decodes, in h's dtype
        (computed in fp32, as ``logits`` does): a patchscope mapping."""
        raise TypeError(f"a {self.lens_type} lens decodes through the model and maps no state; use an affine lens "
                        "(logit, tuned, affine, future) as a mapping")

    def extra_config(self) -> dict:
        """Lens-specific settings stored in the artifact's ``config.json``."""
        return {}

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """h: (num_layers, ..., d_model) → (num_layers, ..., d_model)."""
        raise NotImplementedError


def bind_lenses(lenses: list[Lens], model: FrozenModel) -> None:
    """Refuse ``model`` in one line unless every lens of ``lenses``, and every lens each wraps, was
    made for it; then bind those not bound yet to it. All are checked before any is bound, so a
    refusal binds nothing. A lens without parameters (the logit lens) decodes every model and stays
    unbound."""
    every = [module for lens in lenses for module in lens.modules() if isinstance(module, Lens)]
    for lens in every:
        if lens.unembed_hash not in (None, model.unembed_hash):
            made_for = f"{lens.made_for!r}" if lens.made_for else "another model"
            raise WrongModelError(f"the {lens.key} lens was made for {made_for} (unembedding {lens.unembed_hash}), "
                                  f"not for {model.name!r} (unembedding {model.unembed_hash}); use a lens trained "
                                  "on this model")
    for lens in every:
        if lens.unembed_hash is None and next(lens.parameters(), None) is not None:
            if lens.check_first_model is not None:
                lens.check_first_model(model)
            lens.unembed_hash, lens.made_for = model.unembed_hash, model.name


class LogitLens(Lens):
    """Decode each residual directly (nostalgebraist 2020): the identity map."""

    lens_type = "logit"
    translates = True

    def translate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class TunedLens(Lens):
    """One affine translator per lensed layer, parametrised residually: ``h + W_l h + b_l``.

    W and b start at zero, so an untrained tuned lens *is* the logit lens and weight decay pulls
    each translator towards the identity (Belrose et al. 2023, §3). All layers are applied in one
    batched matrix multiply rather than a Python loop over ``nn.Linear``s.
    """

    lens_type = "tuned"
    translates = True

    def __init__(self, layers: list[int], d_model: int, bias: bool = True, offset: int = 0):
        super().__init__(layers, d_model)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.offset = offset
        """Token offset of the target: 0 = same-position next token (tuned lens), k ≥ 1 = future lens."""
        self.weight = nn.Parameter(torch.zeros(len(layers), d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(len(layers), d_model)) if bias else None

    def extra_config(self) -> dict:
        return {"bias": self.bias is not None, "offset": self.offset}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        flat = h.reshape(shape[0], -1, shape[-1])  # (L, N, d)
        weight_t = self.weight.transpose(1, 2)
        if self.bias is not None:
            delta = torch.baddbmm(self.bias.unsqueeze(1).to(flat.dtype), flat, weight_t.to(flat.dtype))
        else:
            delta = torch.bmm(flat, weight_t.to(flat.dtype))
        return (flat + delta).reshape(shape)

    def translate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            raise ValueError(f"the {self.key} lens has no translator for residual index {layer}; it covers "
                             f"{self.layers[0]}..{self.layers[-1]}")
        i = self.layers.index(layer)
        h32 = h.float()
        bias = self.bias[i].float() if self.bias is not None else None
        return (h32 + F.linear(h32, self.weight[i].float(), bias)).to(h.dtype)

    @torch.no_grad()
    def set_affine(self, a: torch.Tensor, b: torch.Tensor | None) -> None:
        """Make this lens the affine map h ↦ A h + b (A: (num_layers, d, d), b: (num_layers, d)), in
        the residual parametrisation: W = A − I. How a least-squares fit becomes a lens."""
        # Written through .data: under FSDP the parameters are views of one flat parameter, and an
        # in-place write through the autograd view would make the next training forward refuse them.
        self.weight.data.copy_(a - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
        if b is not None:
            if self.bias is None:
                raise ValueError("this lens has no bias to hold b")
            self.bias.data.copy_(b)


class AffineLens(TunedLens):
    """The least-squares affine lens (the "tuned lens" of the Patchscopes paper): the same map
    ``h + W h + b`` = ``A h + b`` with A = I + W, but fitted in closed form to predict the last
    block's raw output (``lenscope.lenses.least_squares``) instead of trained with a KL loss."""

    lens_type = "affine"


LENS_TYPES: dict[str, type[Lens]] = {cls.lens_type: cls for cls in (LogitLens, TunedLens, AffineLens)}
"""Lens classes by ``lens_type``; ``lenscope.lenses.learned_prompt`` adds the learned-prompt lens."""
