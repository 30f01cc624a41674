"""Closed-form affine lens."""

from __future__ import annotations

import pytest
import torch

from lenscope.lenses.least_squares import NormalEquations, tuned_lens_from_affine


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


def test_ridge_keeps_unvisited_directions_finite():
    eq = NormalEquations(num_layers=1, d_model=4)
    h = torch.zeros(1, 10, 4)
    h[0, :, 0] = torch.arange(10.0)  # only one direction ever varies
    eq.update(h, h[0] * 2)
    a, b = eq.solve(ridge=1e-3)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a[0, 0, 0] == pytest.approx(2.0, rel=1e-2)


def test_tuned_lens_from_affine_applies_the_same_map():
    a, b = torch.randn(3, 6, 6), torch.randn(3, 6)
    lens = tuned_lens_from_affine([0, 1, 2], a, b)
    h = torch.randn(3, 5, 6)
    torch.testing.assert_close(lens(h), torch.einsum("lnd,led->lne", h, a) + b[:, None], atol=1e-5, rtol=1e-5)


def test_solve_without_data_is_an_error():
    with pytest.raises(ValueError, match="no positions"):
        NormalEquations(1, 4).solve()
