"""Wanda: score = |W_ij| · ‖X_j‖₂ (Sun et al. 2023, "A Simple and Effective Pruning Approach
for Large Language Models", section 3), compared within each output row.

Worked example: W = [[1, 2, 3, 4]], ‖X‖ = [100, 10, 1, 0.1] gives scores [100, 20, 3, 0.4];
at 50% the two lowest go, so the row becomes [1, 2, 0, 0].
"""

from __future__ import annotations

import torch

from llmprune.core.patterns import select_keep
from llmprune.methods.base import COLUMN_NORMS, HESSIAN, Options, Result, Stats
from llmprune.methods.sparsegpt import obs_update, prepare


def needs(options: Options) -> set[str]:
    return {COLUMN_NORMS, HESSIAN} if options.update == "obs" else {COLUMN_NORMS}


def scores(W: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ broadcast over rows. W: (out, in); column_norms: (in,)."""
    return W.abs().float() * column_norms.float()[None, :]


def prepare_stats(stats: Stats, options: Options) -> Stats:
    return prepare(stats, options) if options.update == "obs" else stats


def prune(W: torch.Tensor, stats: Stats, options: Options) -> Result:
    return prune_by(scores(W, stats[COLUMN_NORMS]), W, stats, options)


def prune_by(weight_scores: torch.Tensor, W: torch.Tensor, stats: Stats, options: Options) -> Result:
    """The mask of the highest ``weight_scores`` (Wanda's or another score read from the same
    input norms), then the OBS update if asked."""
    keep = select_keep(weight_scores, options.pattern, options.sparsity, options.group)
    if options.update == "obs":
        return obs_update(W, stats, keep, options)
    return Result(W.float() * keep, keep)
