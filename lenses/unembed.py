"""The lens losses on top of the model's own decoder, and the one KL.

The decoder is the model's: final norm (and whatever else follows the last block), unembedding
matrix, bias, soft-cap and logit scale, as ``lenscope.model.adapter.ArchitectureAdapter`` finds
them (``FrozenModel.adapter``); nothing here copies it.

The unembedding dominates lens training: for SmolLM2-135M it is 49,152 × 576 multiply-adds per
token per layer, forward and backward, against 576 × 576 for a translator. Two choices follow:

* the matrix products run in ``compute_dtype`` (bf16 by default: ~4× faster than fp32 on CPUs with
  AVX512-BF16, and what the reference uses on GPU); softmax and the KL itself run in fp32;
* the KL loss is fused with its gradient. The forward pass walks the layers one at a time, forms
  the (tokens, vocab) logits, computes the KL and, right away, the gradient with respect to the
  lens's decoded input; only that (tokens, d_model) gradient is kept. Peak memory is one layer's
  logits instead of all layers' logits plus autograd's copies, and no matmul is recomputed.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from lenscope.model.adapter import ArchitectureAdapter

NATS_PER_BIT = math.log(2)
"""Divide nats by this for bits."""


def kl_divergence(target_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ q) in nats over the last dimension, from log-probabilities: Σ p (log p − log q).

    The one KL of lenscope wherever both distributions are at hand (the fused training loss below
    never forms log q). A token of target probability 0 adds 0 whatever q says (0 · log 0 = 0, also
    where log q is −inf); a NaN in q, as a diverged lens gives, stays NaN rather than reading as 0.
    """
    p = target_logp.exp()
    return torch.where(p > 0, p * (target_logp - logq), 0.0).sum(-1)


def _kl_terms(z: torch.Tensor, target_p: torch.Tensor, neg_entropy: torch.Tensor, softcap: float, scale: float,
              want_grad: bool):
    """From raw head outputs z (N, V) of one layer: KL(target ‖ softmax(logits)) per token (N,), the
    log-normaliser (N, 1), and, if asked, d KL / d z (N, V) in z's dtype (not yet divided by N).
    The logits are what the model makes of z: ``scale · z``, then soft-capped (``softcap`` 0: none).

    Uses KL = Σ p log p − Σ p·logits + logsumexp(logits) (Σ p = 1), so log q is never materialised.
    """
    zf = z.float() * scale
    capped = None
    if softcap:
        capped = torch.tanh(zf / softcap)
        zf = capped * softcap
    lse = torch.logsumexp(zf, dim=-1, keepdim=True)
    kl = neg_entropy - (target_p * zf).sum(-1) + lse.squeeze(-1)
    if not want_grad:
        return kl, lse, zf
    grad = torch.exp(zf - lse) - target_p
    if capped is not None:
        grad = grad * (1 - capped * capped)
    return kl, lse, (grad * scale).to(z.dtype)


_compiled_kl_terms = None


def kl_terms(z, target_p, neg_entropy, softcap: float | None, scale: float, want_grad: bool):
    """``_kl_terms`` fused by ``torch.compile`` into two passes over the (N, V) logits.

    Eager PyTorch makes about a dozen memory passes over each (tokens × vocab) tensor; on a CPU
    that costs more than the unembedding matmuls themselves (measured: ~1.1 s vs ~0.12 s per
    layer of 1,024 tokens for SmolLM2). Compilation takes ~20 s once per process (inductor caches
    it on disk); set ``LENSCOPE_COMPILE=0`` to run eagerly. If compilation fails (no C++ compiler),
    we warn once and run eagerly.
    """
    global _compiled_kl_terms
    if _compiled_kl_terms is None:
        if os.environ.get("LENSCOPE_COMPILE", "1") == "0":
            _compiled_kl_terms = _kl_terms
        else:
            _compiled_kl_terms = torch.compile(_kl_terms, dynamic=True)
    try:
        return _compiled_kl_terms(z, target_p, neg_entropy, float(softcap or 0.0), float(scale), want_grad)
    except Exception as err:  # inductor raises many types; all mean "could not compile here"
        if _compiled_kl_terms is _kl_terms:
            raise
        warnings.warn(f"torch.compile failed ({type(err).__name__}); lens losses run eagerly (slower)", stacklevel=2)
        _compiled_kl_terms = _kl_terms
        return _kl_terms(z, target_p, neg_entropy, float(softcap or 0.0), float(scale), want_grad)


def _head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    z = x @ weight.T
    return z + bias.to(z.dtype) if bias is not None else z


class _FusedKL(torch.autograd.Function):
    """Per-layer mean KL(p_target ‖ softmax(decode(x))) with its gradient computed in forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, softcap, scale, target_logp, compute_dtype):
        # x: (L, N, d) normalised inputs to the head; target_logp: (N, V) fp32.
        num_layers, n_tokens, _ = x.shape
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        target_p = target_logp.exp()
        # Σ p log p is the same for every layer: compute it once.
        neg_entropy = (target_p * target_logp).sum(-1)  # (N,)
        losses = torch.empty(num_layers, dtype=torch.float32, device=x.device)
        want_grad = x.requires_grad
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device) if want_grad else None
        for layer in range(num_layers):
            z = _head(x[layer].to(compute_dtype), w, b)
            kl, _lse, grad_z = kl_terms(z, target_p, neg_entropy, softcap, scale, want_grad)
            losses[layer] = kl.mean()
            if want_grad:
                grad_x[layer] = (grad_z @ w).float().div_(n_tokens)
        ctx.save_for_backward(grad_x)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_x,) = ctx.saved_tensors
        grad = grad_x * grad_losses.view(-1, 1, 1)
        return grad, None, None, None, None, None, None


def lens_kl(
    decoder: ArchitectureAdapter, x: torch.Tensor, target_logp: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Per-layer mean KL(target ‖ lens) in nats, differentiable with respect to ``x``.

    x: (L, N, d_head), already through ``decoder.normalize``; target_logp: (N, V) fp32.
    Returns (L,) fp32.
    """
    return _FusedKL.apply(x, decoder.unembedding_weight, decoder.unembedding_bias, decoder.softcap,
                          decoder.logit_scale, target_logp, compute_dtype)


@torch.no_grad()
def lens_metrics(
    decoder: ArchitectureAdapter,
    x: torch.Tensor,
    target_logp: torch.Tensor,
    labels: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Per-layer sums (not means) for evaluation; no gradient.

    x: (L, N, d_head) through ``decoder.normalize``; target_logp: (N, V); labels: (N,) next-token ids, -100 = none.
    Returns ``kl`` (L,) Σ KL(target ‖ lens) in nats, ``ce`` (L,) Σ −log q(label) in nats over the
    labelled tokens, ``n_tokens`` and ``n_labels``.
    """
    w = decoder.unembedding_weight.to(compute_dtype)
    b = decoder.unembedding_bias.to(compute_dtype) if decoder.unembedding_bias is not None else None
    target_p = target_logp.exp()
    neg_entropy = (target_p * target_logp).sum(-1)
    kl = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    ce = torch.zeros_like(kl)
    has_label = labels >= 0 if labels is not None else torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    for layer in range(x.shape[0]):
        z = _head(x[layer].to(compute_dtype), w, b)
        kl_tokens, lse, capped_z = kl_terms(z, target_p, neg_entropy, decoder.softcap, decoder.logit_scale, False)
        kl[layer] = kl_tokens.double().sum()
        if has_label.any():
            picked = capped_z[has_label].gather(-1, labels[has_label].unsqueeze(-1)) - lse[has_label]
            ce[layer] = -picked.double().sum()
    return {"kl": kl, "ce": ce, "n_tokens": torch.tensor(x.shape[1]), "n_labels": torch.tensor(int(has_label.sum()))}


def reference_kl(decoder: ArchitectureAdapter, x: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Unfused per-layer mean KL through autograd; the yardstick the fused version is tested against."""
    z = F.linear(x, decoder.unembedding_weight, decoder.unembedding_bias)
    logq = torch.log_softmax(decoder.finish_logits(z).float(), -1)
    return kl_divergence(target_logp, logq).mean(-1)


@torch.no_grad()
def logit_metrics(logits: torch.Tensor, target_logp: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``lens_metrics`` for lenses that produce logits themselves (the learned-prompt lens).

    logits: (L, N, V); target_logp: (N, V) fp32; labels: (N,), -100 = none. Per-layer sums.
    """
    logq = torch.log_softmax(logits.float(), -1)
    kl = kl_divergence(target_logp, logq).double().sum(-1)
    has_label = labels >= 0 if labels is not None else torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    ce = torch.zeros_like(kl)
    if has_label.any():
        ce = -logq[:, has_label].gather(-1, labels[has_label].view(1, -1, 1).expand(logits.shape[0], -1, 1)).double().sum((1, 2))
    return {"kl": kl, "ce": ce, "n_tokens": torch.tensor(logits.shape[1]), "n_labels": torch.tensor(int(has_label.sum()))}
