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
