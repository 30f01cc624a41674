"""The bigram baseline of Future Lens (Pal et al. 2023).

To predict the token k + 1 positions after the read position t, the bigram baseline looks at the
real token at t + k (the token just before the one to predict) and predicts its most frequent
successor in the fitting documents. For k = 1 (the token after next) that is the paper's baseline:
it is given the true next token, which no lens sees, so it is a strong baseline at small k.
"""

from __future__ import annotations

import torch


def bigram_successors(token_lists: list[list[int]], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) most frequent successor of every token in ``token_lists`` (-1: never seen).

    Counts pairs sparsely (a dense V × V table is GiBs for a 50k vocabulary); ties go to the
    smaller token id, so the table does not depend on hash order.
    """
    pairs = [torch.tensor(t[:-1]) * vocab_size + torch.tensor(t[1:]) for t in token_lists if len(t) > 1]
    best = torch.full((vocab_size,), -1, dtype=torch.long)
    if not pairs:
        return best
    unique, counts = torch.cat(pairs).unique(return_counts=True)
    first, second = unique // vocab_size, unique % vocab_size
    # Sort by (first, -count, second) through one int64 key: the first entry of each run of equal
    # ``first`` is the winner.
    top = int(counts.max()) + 1
    order = (first * top * vocab_size + (top - 1 - counts) * vocab_size + second).argsort()
    f_sorted = first[order]
    is_head = torch.ones_like(f_sorted, dtype=torch.bool)
    is_head[1:] = f_sorted[1:] != f_sorted[:-1]
    best[f_sorted[is_head]] = second[order][is_head]
    return best
