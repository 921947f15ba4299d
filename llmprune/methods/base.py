"""What every pruning method receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from llmprune.core.patterns import Group, Pattern


@dataclass(frozen=True)
class Options:
    """Per-matrix options shared by all methods (validated by :class:`llmprune.engine.config.PruneConfig`).

    ``update="obs"`` re-fits the kept weights with the OBS update (SparseGPT's solver) after the
    mask is chosen; ``"admm"`` solves the least-squares refit on the mask (ADMM, then conjugate
    gradients: :mod:`llmprune.methods.admm`); ``"none"`` only zeroes the pruned weights.
    ``refine="dsnot"`` changes the mask first (:mod:`llmprune.methods.dsnot`).
    """

    pattern: Pattern = field(default_factory=Pattern)
    sparsity: float = 0.5
    group: Group = "row"  # "global": the driver gives each linear its own sparsity
    update: Literal["none", "obs", "admm"] = "none"
    blocksize: int = 128
    damp: float = 0.01
    nm_select: Literal["joint", "score"] = "joint"  # SparseGPT's N:M mask choice per group
    shrink: float = 0.1  # OBS Hessian shrunk toward its diagonal: (1 - shrink)·H + shrink·diag(H)
    refine: Literal["none", "dsnot"] = "none"
    admm_iterations: int | None = None  # None: 20 from a plain mask, 0 from another update's answer
    cg_iterations: int = 10
    dsnot_cycles: int = 50
    # The least-squares refit's target: 0 the dense linear on the pruned model's inputs (WX_p, the
    # classic layer-wise objective), 1 the dense model's own outputs at the linear (WX_d), between
    # a mix of the two. Needs the CROSS statistic (the driver's dense stream) and update "admm".
    model_target: float = 0.0
    keep_zeros: bool = False  # the matrix's exact zeros stay pruned (a later step of a schedule)


@dataclass
class Result:
    """``weight``: (out, in) fp32 pruned weight; ``keep``: bool (out, in), True = kept."""

    weight: torch.Tensor
    keep: torch.Tensor
    damp_used: float | None = None


# Names of the statistics a method may ask for; the driver computes them per shared input.
HESSIAN = "hessian"
COLUMN_NORMS = "column_norms"
# Derived once per shared input by the OBS solver's ``prepare``.
FACTOR = "inverse_hessian_factor"
DEAD = "dead_inputs"
DAMP_USED = "damp_used"
DAMPED = "damped_hessian"  # the ADMM refit's shrunk, damped H
# 2/n·(X_d − X_p)ᵀX_p with X_d the dense model's inputs at the linear (core.stats.CrossDifference),
# and the shift of the refit's target it gives, model_target·(1 − shrink)·that, derived by the refit.
CROSS = "cross_hessian"
SHIFT = "target_shift"
# Per-weight statistics ((out, in) like W), from gradients of the network loss on the dense
# model (:mod:`llmprune.engine.gradients`), not from a linear's inputs.
FISHER = "fisher"
GRADIENT = "gradient"
PER_WEIGHT = frozenset({FISHER, GRADIENT})
Stats = dict[str, torch.Tensor]
