"""The least-squares affine lens (the "tuned lens" of the Patchscopes paper), fitted in closed form.

For each lensed layer ℓ, find A_ℓ, b_ℓ minimising Σ ‖A_ℓ h_ℓ + b_ℓ − h_L‖² over cached positions,
where h_L is the last block's raw output (decoded afterwards by the model's own final norm and
head). The normal equations are accumulated in float64 batch by batch — (d+1)² + (d+1)·d numbers
per layer, whatever the number of positions — and solved once, with a small ridge term for
directions the data never visit. The result maps to the residual parametrisation of
``TunedLens`` as W = A − I, so it can warm-start KL training (``TunedLens.from_affine``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from lenscope.lenses.lens import TunedLens


class UnderdeterminedFitWarning(UserWarning):
    """A least-squares fit had fewer positions than unknowns per output coordinate."""


class NormalEquations:
    """Running Σ x̃ x̃ᵀ and Σ x̃ yᵀ per layer, with x̃ = [h, 1]. The targets y have ``d_out``
    numbers (default: ``d_model``, a map within one model; another model's width, or several of its
    layers side by side, for a map between models)."""

    def __init__(self, num_layers: int, d_model: int, device: torch.device | str = "cpu", d_out: int | None = None):
        d_out = d_model if d_out is None else d_out
        self.xtx = torch.zeros(num_layers, d_model + 1, d_model + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(num_layers, d_model + 1, d_out, dtype=torch.float64, device=device)
        self.count = 0

    @property
    def unknowns(self) -> int:
        """Unknowns per output coordinate: the input width plus the bias."""
        return self.xtx.shape[-1]

    @property
    def underdetermined(self) -> bool:
        """Fewer positions than unknowns: the data leave some directions to the ridge term alone
        (a warm start on 32 positions for width 640 gave 126 bits of KL, far worse than the logit
        lens)."""
        return self.count < self.unknowns

    def update(self, h: torch.Tensor, target: torch.Tensor) -> None:
        """h: (num_layers, N, d) inputs; target: (N, d_out), the same for every layer (the last
        block's raw output, for a lens)."""
        self._to(h.device)
        x = _with_ones(h)
        self.xtx += x.transpose(1, 2) @ x
        self.xty += x.transpose(1, 2) @ target.double().expand(h.shape[0], *target.shape)
        self.count += h.shape[1]

    def _to(self, device: torch.device) -> None:
        if self.xtx.device != device:
            self.xtx, self.xty = self.xtx.to(device), self.xty.to(device)

    def summed(self, sum_over_processes) -> NormalEquations:
        """New equations holding these summed over processes, each of which accumulated its own
        share of the data; ``sum_over_processes`` all-reduces a tensor in place (Lightning's
        ``strategy.reduce(t, reduce_op="sum")``). These stay as they are."""
        total = NormalEquations.__new__(NormalEquations)
        total.xtx = sum_over_processes(self.xtx.clone())
        total.xty = sum_over_processes(self.xty.clone())
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.xtx.device)
        total.count = int(sum_over_processes(count))
        return total

    def solve(self, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns A (num_layers, d_out, d) and b (num_layers, d_out) with prediction h Aᵀ + b.

        ``ridge`` is relative to each coordinate's own spread: the penalty on coordinate k is
        ridge × Σ (h_k − mean h_k)², the ridge of standardised inputs, so it means the same
        whatever the scale of the residual stream and however unequal its coordinates are (a few
        massive activations set a mean-based λ that shrank a map between equal states 15% away
        from the identity). The bias is not penalised.
        """
        if self.count == 0:
            raise ValueError("no positions were accumulated")
        if self.underdetermined:
            # Warned, not refused, here where every fit is made (warm start, affine recipe, evaluation,
            # cross-model map): a training run's early solves see few positions and keep going; a
            # report marks such a fit (the evaluation's summary never lists it first).
            warnings.warn(UnderdeterminedFitWarning(
                f"least-squares fit on {self.count:,} positions for inputs of width {self.unknowns - 1} ({self.unknowns} "
                f"unknowns per output with the bias) is underdetermined: the ridge term alone sets the other directions "
                f"and the map can be far worse than none; fit on at least {self.unknowns} positions (more documents or "
                "batches)"), stacklevel=2)
        count = self.xtx[:, -1:, -1:]  # Σ 1 = N, per layer
        sums = self.xtx[:, :-1, -1]  # Σ h_k
        spread = (self.xtx.diagonal(dim1=1, dim2=2)[:, :-1] - sums**2 / count[:, :, 0]).clamp(min=0)  # N × var h_k
        # A coordinate the data hold constant (or fewer positions than coordinates) still gets a
        # small penalty, so the system stays solvable.
        spread = spread + 1e-6 * spread.mean(-1, keepdim=True) + 1e-12 * count[:, :, 0]
        penalty = torch.zeros_like(self.xtx)
        penalty[:, :-1, :-1] = torch.diag_embed(ridge * spread)
        solution = torch.linalg.solve(self.xtx + penalty, self.xty)  # (L, d+1, d_out)
        return solution[:, :-1].transpose(1, 2).float(), solution[:, -1].float()


    def fit(self, lens: TunedLens, ridge: float = 1e-3) -> TunedLens:
        """Write the least-squares solution into ``lens`` (an ``AffineLens``, or a tuned lens to
        warm-start) and return it: the one place a fit becomes a lens."""
        lens.set_affine(*self.solve(ridge))
        return lens


def _with_ones(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x̃ = [h, 1] in float64: (..., d) → (..., d + 1), in one copy (into ``out`` if given)."""
    x = torch.empty(*h.shape[:-1], h.shape[-1] + 1, dtype=torch.float64, device=h.device) if out is None else out
    x[..., :-1] = h
    x[..., -1] = 1.0
    return x


ROWS_PER_PRODUCT = 2048
"""Positions per float64 product in :func:`update_on_subsets` (memory and speed, not results)."""


def update_on_subsets(equations: Sequence[NormalEquations], h: torch.Tensor,
                      subsets: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Update several fits whose inputs are subsets of the same states, as
    ``eq.update(h[:, index], target)`` for each ``(index, target)`` would, at a fraction of the
    cost: the future lenses' fits take the read positions whose t + k is in the document, nearly
    the same set for every offset k.

    h: (num_layers, N, d); ``index``: positions of h the fit takes (distinct); ``target``:
    (len(index), d_out). Σ x̃ x̃ᵀ is formed once over all N positions and each fit subtracts the few
    rows it lacks; every Σ x̃ yᵀ comes from one product with the targets side by side (zero where a
    fit lacks the position). Equal to separate updates up to float64 rounding; for 4 fits of width
    d it does ~60% of their multiplications. The shared products take h in float64
    ``ROWS_PER_PRODUCT`` positions at a time, in one buffer; the rows a fit takes or lacks are
    copied again."""
    if not equations:
        return
    num_layers, n, d = h.shape
    widths = [target.shape[-1] for _, target in subsets]
    y = torch.zeros(n, sum(widths), dtype=torch.float64, device=h.device)
    start = 0
    for (index, target), width in zip(subsets, widths, strict=True):
        y[index, start:start + width] = target.double()
        start += width
    # Σ x̃ x̃ᵀ over all positions and every Σ x̃ yᵀ side by side, ROWS_PER_PRODUCT positions at a
    # time, copied to float64 into one buffer laid out position-major: each layer's Σ x̃ x̃ᵀ reads
    # its slice in place, and every layer's Σ x̃ yᵀ is one matrix product (all layers side by side).
    gram = torch.zeros(num_layers, d + 1, d + 1, dtype=torch.float64, device=h.device)
    products = torch.zeros(num_layers * (d + 1), y.shape[1], dtype=torch.float64, device=h.device)
    x = torch.empty(min(n, ROWS_PER_PRODUCT), num_layers, d + 1, dtype=torch.float64, device=h.device)
    for start in range(0, n, ROWS_PER_PRODUCT):
        chunk = _with_ones(h[:, start:start + ROWS_PER_PRODUCT].transpose(0, 1), out=x[:min(ROWS_PER_PRODUCT, n - start)])
        by_layer = chunk.transpose(0, 1)  # (num_layers, positions, d + 1), a view
        gram.baddbmm_(by_layer.transpose(1, 2), by_layer)
        products.addmm_(chunk.view(len(chunk), -1).T, y[start:start + len(chunk)])
    products = products.view(num_layers, d + 1, y.shape[1])
    start = 0
    for eq, (index, _), width in zip(equations, subsets, widths, strict=True):
        eq._to(h.device)
        if 2 * len(index) < n:  # fewer rows taken than lacking: their own product is cheaper
            taken = _with_ones(h[:, index])
            eq.xtx.baddbmm_(taken.transpose(1, 2), taken)
        else:
            lacking = torch.ones(n, dtype=torch.bool, device=h.device)
            lacking[index] = False
            eq.xtx += gram
            if bool(lacking.any()):
                missing = _with_ones(h[:, lacking])
                eq.xtx.baddbmm_(missing.transpose(1, 2), missing, alpha=-1)
        eq.xty += products[..., start:start + width]
        eq.count += len(index)
        start += width


class LeastSquaresFit(torch.optim.Optimizer):
    """The closed-form fit of affine lenses behind the interface of a torch optimizer.

    A gradient optimizer's ``step`` uses the gradients a backward pass left; this one's
    ``step(closure)`` takes what the closure returns, ``{lens key: (h (num_layers, N, d), target
    (N, d))}``, and adds the pairs to that lens's normal equations: no loss, no gradient, and the
    lenses stay as they are until ``NormalEquations.fit`` writes the solution into them. Being an
    optimizer is what lets a training loop (Lightning's, with ``automatic_optimization = False``)
    count, stop, checkpoint and resume a fit in steps, as it does gradient training.

    ``params`` are the lenses' parameters (what the loop expects an optimizer to own); their state
    is a step count. ``equations`` are kept by reference and are not in ``state_dict``: under data
    parallelism each process accumulates its own share and a checkpoint needs their sum
    (``NormalEquations.summed``), which only the owner of the equations can take.
    """

    def __init__(self, params, equations: dict[str, NormalEquations]):
        super().__init__(params, {})
        self.equations = equations

    @torch.no_grad()
    def step(self, closure):  # noqa: D102 (see the class)
        pairs = closure()
        unknown = set(pairs) - set(self.equations)
        if unknown:
            raise KeyError(f"no normal equations for lenses {sorted(unknown)}")
        for key, (h, target) in pairs.items():
            self.equations[key].update(h, target)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = state.get("step", torch.tensor(0.0)) + 1
        return pairs
