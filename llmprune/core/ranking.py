"""Rank statistics for comparing a saliency criterion with the oracle.

Spearman's ρ is Pearson's correlation of the two rankings, ties given their average rank.
Worked example: x = [1, 2, 3, 4], y = [10, 30, 20, 40]: ranks [1, 2, 3, 4] and [1, 3, 2, 4],
d = [0, -1, 1, 0], so with no ties ρ = 1 − 6·Σd²/(n(n²−1)) = 1 − 12/60 = 0.8.
"""

from __future__ import annotations

import math

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor (float64), equal values sharing the mean of their ranks."""
    x = values.double().reshape(-1)
    order = torch.sort(x, stable=True).indices
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    unique, inverse = torch.unique(x, return_inverse=True)
    if unique.numel() < x.numel():  # ties: each value's ranks replaced by their mean
        sums = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long 1-D tensors; NaN when either is constant
    (no ranking to compare) or they hold fewer than two values."""
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs equally long inputs, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return math.nan
    a, b = average_ranks(x), average_ranks(y)
    a, b = a - a.mean(), b - b.mean()
    scale = float(a.norm() * b.norm())
    return float((a * b).sum()) / scale if scale > 0 else math.nan
