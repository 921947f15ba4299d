"""Non-uniform layer sparsity: OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity").

Layers whose weights hold more *outliers* (Wanda scores |W_ij|·‖X_j‖ far above their mean) lose
more when pruned, so they keep more. For decoder layer l, with D_l its outlier ratio (the share
of its scores, over all its linears together, above ``m`` × their mean):

    spread_l  = 2λ · (D_l − min D) / (max D − min D)          in [0, 2λ]
    density_l = spread_l − mean(spread) + (1 − target)
    sparsity_l = 1 − density_l

The paper averages over layers; here the mean is weighted by each layer's prunable weights, so
the sparsity over all pruned weights is exactly the target even when layers differ in size.
λ = 0 (or equal ratios) is uniform. Worked example: ratios [0.01, 0.02, 0.03], equal sizes,
target 0.5, λ = 0.1: spread [0, 0.1, 0.2], mean 0.1, densities [0.4, 0.5, 0.6], sparsities
[0.6, 0.5, 0.4].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from llmprune.errors import LlmpruneError


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """The share of all entries of ``scores`` (one tensor per linear of a layer) above ``m``
    times their common mean."""
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.double().sum()) for s in scores) / total
    above = sum(int((s.double() > m * mean).sum()) for s in scores)
    return above / total


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-layer sparsities with the size-weighted mean exactly ``target`` (see the module)."""
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("one ratio and one size per layer")
    r = torch.tensor(ratios, dtype=torch.float64)
    weights = torch.tensor(sizes, dtype=torch.float64)
    weights = weights / weights.sum()
    span = float(r.max() - r.min())
    if lam == 0 or span == 0:
        return [float(target)] * len(ratios)
    spread = (r - r.min()) / span * (2 * lam)
    density = spread - float((spread * weights).sum()) + (1 - target)
    sparsity = 1 - density
    if float(sparsity.min()) < 0 or float(sparsity.max()) >= 1:
        raise LlmpruneError(f"OWL with lambda {lam:g} around sparsity {target:g} gives layer sparsities from "
                            f"{float(sparsity.min()):.3f} to {float(sparsity.max()):.3f}, outside [0, 1); "
                            "use a smaller owl_lambda")
    return [float(s) for s in sparsity]


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of points sorted by x (Andrew's monotone chain, lower half)."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def sensitivity_sparsities(ratios: Sequence[float], costs: Sequence[Sequence[float]], sizes: Sequence[int],
                           target: float) -> list[float]:
    """Per-layer sparsities from measured sensitivity curves (Li et al. 2016's per-layer
    analysis, turned into an allocation): ``costs[l][k]`` is what pruning layer l alone to
    ``ratios[k]`` cost (llmprune uses log(ppl / dense ppl)); zero at sparsity 0.

    Each curve is made non-decreasing and replaced by its lower convex hull through (0, 0);
    the layers' hull segments are then filled cheapest first, by cost per pruned weight (slope
    / layer size), until the size-weighted mean sparsity is exactly ``target``: the allocation
    minimising the summed cost of the hulls. No layer goes past the largest measured ratio.
    Worked example: ratios [0.4, 0.8], two equal layers with costs
    [0.1, 0.2] and [1.0, 3.0], target 0.4: layer 0's whole hull (slope 0.25) fills first,
    to 0.8; layer 1 stays at 0: sparsities [0.8, 0.0].
    """
    if not ratios or len(costs) != len(sizes) or not costs or any(len(c) != len(ratios) for c in costs):
        raise ValueError("one cost per ratio for every layer, and one size per layer")
    if any(b <= a for a, b in itertools.pairwise(ratios)) or not ratios[0] > 0:
        raise ValueError("ratios must rise and be above 0")
    top = ratios[-1]
    if not 0 <= target <= top + 1e-12:
        raise LlmpruneError(f"the sensitivity curves reach sparsity {top:g}; an allocation around {target:g} "
                            f"would have to guess beyond them: measure higher ratios, or aim at most {top:g}")
    segments = []  # (cost per pruned weight, layer, order, width)
    for layer, (curve, size) in enumerate(zip(costs, sizes, strict=True)):
        running, points = 0.0, [(0.0, 0.0)]
        for r, c in zip(ratios, curve, strict=True):
            running = max(running, float(c))
            points.append((float(r), running))
        hull = _lower_hull(points)
        for order, ((x0, y0), (x1, y1)) in enumerate(itertools.pairwise(hull)):
            segments.append(((y1 - y0) / (x1 - x0) / max(size, 1), layer, order, x1 - x0))
    need = target * sum(sizes)
    sparsity = [0.0] * len(sizes)
    ordered = sorted(segments)
    start = 0
    while start < len(ordered) and need > 0:
        # Segments of equal cost (layers with the same curve) fill together, in proportion.
        end = start
        while end < len(ordered) and ordered[end][0] <= ordered[start][0] * (1 + 1e-12):
            end += 1
        tied = ordered[start:end]
        room = sum(width * sizes[layer] for _, layer, _, width in tied)
        share = min(1.0, need / room) if room > 0 else 1.0
        for _, layer, _, width in tied:
            sparsity[layer] += width * share
        need -= room * share
        start = end
    return sparsity
