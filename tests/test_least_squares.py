"""Closed-form affine lens."""

from __future__ import annotations

import pytest
import torch

from lenscope.lenses import least_squares
from lenscope.lenses.least_squares import LeastSquaresFit, NormalEquations, update_on_subsets
from lenscope.lenses.lens import AffineLens, TunedLens


def test_recovers_an_exact_affine_map_batch_by_batch():
    g = torch.Generator().manual_seed(0)
    a_true = torch.randn(2, 8, 8, generator=g)
    b_true = torch.randn(2, 8, generator=g)
    eq = NormalEquations(num_layers=2, d_model=8)
    for _ in range(5):  # accumulating in pieces must equal one big fit
        h = torch.randn(2, 40, 8, generator=g)
        # Both layers must predict the same target: build it from layer 0 and make layer 1 an
        # invertible transform of layer 0, so both have exact affine solutions.
        h[1] = h[0] @ torch.linalg.inv(a_true[1]).T
        target = h[0] @ a_true[0].T + b_true[0]
        eq.update(h, target)
    a, b = eq.solve(ridge=1e-10)
    torch.testing.assert_close(a[0], a_true[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(b[0], b_true[0], atol=1e-3, rtol=0)
    prediction = h[1] @ a[1].T + b[1]
    torch.testing.assert_close(prediction, h[0] @ a_true[0].T + b_true[0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("rows_per_product", [2048, 16])
def test_fits_on_subsets_of_shared_inputs_equal_separate_fits(rows_per_product, monkeypatch):
    """The future offsets' fits share one product (update_on_subsets): every subset size, from all
    positions to a few and none, and targets of different widths; the positions in one product
    or in several through the one buffer (16 at a time: three full, one partial)."""
    monkeypatch.setattr(least_squares, "ROWS_PER_PRODUCT", rows_per_product)
    g = torch.Generator().manual_seed(1)
    widths, n = [6, 6, 6, 3, 6], 50
    shared = [NormalEquations(3, 8, d_out=w) for w in widths]
    separate = [NormalEquations(3, 8, d_out=w) for w in widths]
    for _ in range(3):
        h = torch.randn(3, n, 8, generator=g)
        subsets = [(torch.arange(n), torch.randn(n, 6, generator=g)),
                   (torch.arange(n - 2), torch.randn(n - 2, 6, generator=g)),  # all but the last k
                   (torch.tensor([3, 9, 11]), torch.randn(3, 6, generator=g)),  # a few
                   (torch.randperm(n, generator=g)[:30], torch.randn(30, 3, generator=g)),
                   (torch.tensor([], dtype=torch.long), torch.randn(0, 6, generator=g))]  # none
        update_on_subsets(shared, h, subsets)
        for eq, (index, target) in zip(separate, subsets, strict=True):
            eq.update(h[:, index], target)
    for a, b in zip(shared, separate, strict=True):
        assert a.count == b.count
        torch.testing.assert_close(a.xtx, b.xtx, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(a.xty, b.xty, rtol=1e-12, atol=1e-10)
    assert shared[-1].count == 0 and not shared[-1].xtx.any()


def test_ridge_keeps_unvisited_directions_finite():
    eq = NormalEquations(num_layers=1, d_model=4)
    h = torch.zeros(1, 10, 4)
    h[0, :, 0] = torch.arange(10.0)  # only one direction ever varies
    eq.update(h, h[0] * 2)
    a, b = eq.solve(ridge=1e-3)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a[0, 0, 0] == pytest.approx(2.0, rel=1e-2)


def test_set_affine_applies_the_same_map():
    a, b = torch.randn(3, 6, 6), torch.randn(3, 6)
    lens = TunedLens([0, 1, 2], 6)
    lens.set_affine(a, b)
    h = torch.randn(3, 5, 6)
    torch.testing.assert_close(lens(h), torch.einsum("lnd,led->lne", h, a) + b[:, None], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no bias"):
        TunedLens([0, 1, 2], 6, bias=False).set_affine(a, b)


def test_fit_writes_the_solution_into_the_lens():
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 4), torch.randn(2, 4)
    h = torch.randn(2, 300, 4)
    eq = NormalEquations(2, 4)
    eq.update(h, torch.einsum("nd,ed->ne", h[1], a[1]) + b[1])
    lens = eq.fit(AffineLens([0, 1], 4), ridge=1e-9)
    torch.testing.assert_close(lens(h)[1], torch.einsum("nd,ed->ne", h[1], a[1]) + b[1], atol=1e-4, rtol=1e-4)


def test_solve_without_data_is_an_error():
    with pytest.raises(ValueError, match="no positions"):
        NormalEquations(1, 4).solve()


def test_least_squares_fit_steps_fold_pairs_into_the_equations_without_gradients():
    torch.manual_seed(0)
    lens = AffineLens([0, 1], 4)
    equations = {"affine": NormalEquations(2, 4)}
    fit = LeastSquaresFit(lens.parameters(), equations)
    a, b = torch.randn(2, 4, 4), torch.randn(2, 4)
    for _ in range(3):
        h = torch.randn(2, 50, 4)
        fit.step(lambda h=h: {"affine": (h, torch.einsum("nd,ed->ne", h[0], a[0]) + b[0])})
    assert equations["affine"].count == 150
    assert lens.weight.abs().max() == 0 and lens.weight.grad is None  # a step never touches the lens
    assert all(float(fit.state[p]["step"]) == 3 for p in lens.parameters())
    equations["affine"].fit(lens, ridge=1e-9)
    h = torch.randn(2, 5, 4)
    torch.testing.assert_close(lens(h)[0], torch.einsum("nd,ed->ne", h[0], a[0]) + b[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError, match="tuned"):
        fit.step(lambda: {"tuned": (h, h[0])})


def test_a_map_between_equal_states_is_the_identity_despite_massive_coordinates():
    """Residual streams have a few coordinates hundreds of times larger than the rest; the ridge
    is per coordinate, so it does not shrink the ordinary ones (a λ from the mean of Σ h² did, by
    ~15% on the embedded model)."""
    torch.manual_seed(0)
    h = torch.randn(1, 2000, 16)
    h[0, :, 3] = h[0, :, 3] * 3000 + 500  # one massive, offset coordinate
    eq = NormalEquations(num_layers=1, d_model=16)
    eq.update(h, h[0])
    a, b = eq.solve(ridge=1e-3)
    mapped = h[0] @ a[0].T + b[0]
    assert float(((mapped - h[0]).norm(dim=-1) / h[0].norm(dim=-1)).mean()) < 2e-3
