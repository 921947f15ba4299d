"""DSnoT mask refinement: training-free prune-and-grow (Zhang et al. 2024, "Dynamic Sparse No
Training: Training-Free Fine-tuning for Sparse LLMs").

A mask changes each output's expected value: with input means μ, row r shifts by
e_r = Σ_{j pruned} W_rj μ_j. DSnoT swaps weights, one pair per row per cycle, to shrink |e_r|
while keeping every row's count (and every N:M group's):

* **grow** the pruned weight whose contribution d_j = W_rj μ_j has the sign of e_r and the
  largest |d_j| / Var(X_j) (a large mean effect on an input that varies little);
* **prune** a kept weight whose d_k has the opposite sign (pruning it also moves e_r toward 0),
  the one with the lowest Wanda score |W_rk|·‖X_k‖; for N:M the lowest-scoring kept weight of
  the grown weight's group, whatever its sign.

A row stops at its first swap that would not strictly lower |e_r| or would flip its sign (the
reference stops on the flip and on a fixed threshold; the strict decrease makes the objective
monotone, which the tests check). At most ``cycles`` swaps per row.

Worked example: one row W = [4, 3, 1, 2], μ = [−0.25, 1, 1, 1], unit norms and variances,
50% by magnitude → keep columns 0 and 1, pruned d = [1, 2], e = 3. Grow column 3 (the largest
d of e's sign), prune column 0 (the only kept weight with d < 0, −1): e becomes 3 − 1 − 2 = 0,
accepted. Next cycle: no kept weight with d < 0 is left, so the row stops with keep [1, 3].
"""

from __future__ import annotations

import torch

from llmprune.core.stats import MEAN_VAR
from llmprune.methods.base import COLUMN_NORMS, Options, Stats

VAR_FLOOR = 1e-8  # relative to the mean variance: inputs that never vary rank first, not infinite


def needs(options: Options) -> set[str]:
    return {MEAN_VAR, COLUMN_NORMS}


def expected_shift(W: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_r = Σ_{j pruned} W_rj μ_j per row, (out,) in float64."""
    return ((W.double() * mean.double()[None, :]) * (~keep)).sum(1)


def refine(W: torch.Tensor, stats: Stats, keep: torch.Tensor, options: Options) -> torch.Tensor:
    """The refined keep mask of the dense weights ``W`` (out, in): same count per row (and per
    N:M group) as ``keep``, |e_r| never larger."""
    mean, var = stats[MEAN_VAR][0].float(), stats[MEAN_VAR][1].float()
    norms = stats[COLUMN_NORMS].float()
    W = W.float()
    d = W * mean[None, :]
    var = var.clamp_min(VAR_FLOOR * float(var.mean().clamp_min(VAR_FLOOR)))
    grow_key = d / var[None, :]
    wanda = W.abs() * norms[None, :]
    keep = keep.clone()
    e = expected_shift(W, keep, mean)
    if options.pattern.kind == "nm":
        return _refine_nm(keep, d.double(), grow_key, wanda, e, options.pattern.m, options.dsnot_cycles)
    return _refine_rows(keep, d.double(), grow_key, wanda, e, options.dsnot_cycles)


def _refine_rows(keep: torch.Tensor, d: torch.Tensor, grow_key: torch.Tensor, wanda: torch.Tensor,
                 e: torch.Tensor, cycles: int) -> torch.Tensor:
    sign = torch.sign(e)[:, None]  # the sign each row keeps
    pruned = ~keep
    # Candidates in order: grow the largest same-sign d/Var first, prune the lowest Wanda score
    # among opposite-sign kept weights first. Swaps of one row are a prefix of these lists.
    grow_score = torch.where(pruned & (torch.sign(d) == sign) & (sign != 0), (grow_key * sign).double(),
                             torch.tensor(-torch.inf, dtype=torch.float64))
    prune_score = torch.where(keep & (torch.sign(d) == -sign), wanda.double(),
                              torch.tensor(torch.inf, dtype=torch.float64))
    steps = min(cycles, keep.shape[1])
    if steps <= 0:
        return keep
    grow_value, grow_index = grow_score.topk(steps, dim=1)
    prune_value, prune_index = (-prune_score).topk(steps, dim=1)
    dg, dp = d.gather(1, grow_index), d.gather(1, prune_index)
    valid = torch.isfinite(grow_value) & torch.isfinite(prune_value)
    active = torch.ones_like(e, dtype=torch.bool)
    accepted = torch.zeros_like(e, dtype=torch.long)
    for t in range(steps):
        after = e + dp[:, t] - dg[:, t]
        ok = active & valid[:, t] & (after.abs() < e.abs()) & (torch.sign(after) != -sign[:, 0])
        e = torch.where(ok, after, e)
        accepted += ok.long()
        active = ok
        if not bool(active.any()):
            break
    taken = torch.arange(steps, device=keep.device)[None, :] < accepted[:, None]
    keep.scatter_(1, grow_index, torch.where(taken, True, keep.gather(1, grow_index)))
    keep.scatter_(1, prune_index, torch.where(taken, False, keep.gather(1, prune_index)))
    return keep


def _refine_nm(keep: torch.Tensor, d: torch.Tensor, grow_key: torch.Tensor, wanda: torch.Tensor,
               e: torch.Tensor, m: int, cycles: int) -> torch.Tensor:
    rows, cols = keep.shape
    sign = torch.sign(e)[:, None]
    grow_score = torch.where(~keep & (torch.sign(d) == sign) & (sign != 0), (grow_key * sign).double(),
                             torch.tensor(-torch.inf, dtype=torch.float64))
    steps = min(cycles, cols)
    if steps <= 0:
        return keep
    grow_value, grow_index = grow_score.topk(steps, dim=1)
    fixed = torch.zeros_like(keep)  # grown weights are never pruned again
    active = torch.ones(rows, dtype=torch.bool, device=keep.device)
    offsets = torch.arange(m, device=keep.device)[None, :]
    row = torch.arange(rows, device=keep.device)
    for t in range(steps):
        g = grow_index[:, t]
        starts = g - g % m
        group = starts[:, None] + offsets  # (rows, m)
        candidate = keep.gather(1, group) & ~fixed.gather(1, group)
        score = torch.where(candidate, wanda.gather(1, group).double(), torch.tensor(torch.inf, dtype=torch.float64))
        lowest = score.argmin(1)
        p = starts + lowest
        has = torch.isfinite(score.gather(1, lowest[:, None]))[:, 0] & torch.isfinite(grow_value[:, t])
        after = e + d[row, p] - d[row, g]
        ok = active & has & (after.abs() < e.abs()) & (torch.sign(after) != -sign[:, 0])
        e = torch.where(ok, after, e)
        keep[row[ok], g[ok]] = True
        fixed[row[ok], g[ok]] = True
        keep[row[ok], p[ok]] = False
        active = ok
        if not bool(active.any()):
            break
    return keep
