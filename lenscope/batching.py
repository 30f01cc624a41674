"""How to cut work into passes when a pass costs as much as its widest row.

A padded batch of documents costs its rows × its longest document; a patched pass whose blocks below
the lowest layer written are skipped costs its rows × the blocks its lowest-layer row needs. Both
are rows of one width each, sorted by width, cut into runs: the narrow rows should not ride in a
pass with a wide one, yet every pass has a fixed cost of its own.
"""

from __future__ import annotations

import itertools

import numpy as np


def cheapest_runs(widths: list[int], max_run: int, pass_cost: float) -> list[list[int]]:
    """Cut rows sorted by width (``widths`` ascending) into runs of at most ``max_run`` consecutive
    rows with the least Σ (rows in the run × its widest row) + ``pass_cost`` per run. Exact, by
    dynamic programming over where the runs end (n steps of max_run candidates each, vectorised).
    Returns the runs as lists of indices into ``widths``, in order."""
    if max_run < 1:
        raise ValueError(f"cheapest_runs needs max_run >= 1, got {max_run}")
    if any(a > b for a, b in itertools.pairwise(widths)):
        raise ValueError("cheapest_runs needs the widths sorted ascending")
    n = len(widths)
    width = np.asarray(widths, dtype=np.float64)
    index = np.arange(n + 1)
    best = np.full(n + 1, np.inf)  # best[i]: the cost of the first i rows
    best[0] = 0.0
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        # The last run is rows begin..end - 1; the first begin of the least cost wins a tie.
        begin = max(0, end - max_run)
        cost = best[begin:end] + (end - index[begin:end]) * width[end - 1] + pass_cost
        at = int(cost.argmin())
        best[end], start[end] = cost[at], begin + at
    runs, end = [], n
    while end:
        runs.append(list(range(start[end], end)))
        end = start[end]
    return runs[::-1]


def cheapest_passes(widths: list[int], max_run: int, pass_cost: float) -> list[list[int]]:
    """Rows in any order, one width each → passes (lists of row indices, each sorted by width):
    the rows sorted by width (stably), cut by :func:`cheapest_runs`."""
    order = sorted(range(len(widths)), key=widths.__getitem__)
    return [[order[i] for i in run] for run in cheapest_runs([widths[i] for i in order], max_run, pass_cost)]
