"""The linear-probe baseline of attribute extraction (Patchscopes Table 2): per layer, a multinomial
logistic regression from the subject's hidden state to the object (one class per object),
cross-validated.

Every layer's probe is fitted at once: the layers' losses are independent and summed, so one
L-BFGS run over the stacked weights fits each of them (the sum's minimum is each term's minimum).
Features are standardised on each training fold; an L2 penalty keeps the problem strictly convex
when there are fewer examples than dimensions, as there always are here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_probes(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-2,
               max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (L, N, d) features, y: (N,) classes → per-layer (weight (L, d, C), bias (L, C), mean, std)."""
    x = x.double()
    mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True, unbiased=False).clamp_min(1e-6)  # one example: 0, not NaN
    z = (x - mean) / std
    layers, n, d = z.shape
    weight = torch.zeros(layers, d, num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(layers, num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = y.expand(layers, n).reshape(-1)

    def closure():
        optimizer.zero_grad()
        logits = torch.baddbmm(bias.unsqueeze(1), z, weight)  # (L, N, C)
        loss = F.cross_entropy(logits.reshape(-1, num_classes), target, reduction="sum") / n
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach(), mean, std


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, folds: int = 5, l2: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Cross-validated accuracy per layer: x (L, N, d), y (N,) class ids → (L,). Examples are
    shuffled (seeded) into ``folds`` folds; each is predicted by probes fitted on the others."""
    n = x.shape[1]
    if n < 2:
        raise ValueError(f"a probe needs at least 2 examples, got {n}")
    folds = min(folds, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    num_classes = int(y.max()) + 1
    correct = torch.zeros(x.shape[0], dtype=torch.float64)
    for k in range(folds):
        test = order[k::folds]
        train = torch.ones(n, dtype=torch.bool)
        train[test] = False
        weight, bias, mean, std = fit_probes(x[:, train], y[train], num_classes, l2)
        z = (x[:, test].double() - mean) / std
        predicted = torch.baddbmm(bias.unsqueeze(1), z, weight).argmax(-1)  # (L, n_test)
        correct += (predicted == y[test]).double().sum(-1)
    return (correct / n).float()
