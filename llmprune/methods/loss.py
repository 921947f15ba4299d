"""Saliencies of the *network* loss, from gradients of the dense model's calibration loss
(:mod:`llmprune.engine.gradients`), one number per weight, compared like any other score.

* ``obd``: s_q = ½ · F_qq · w_q², Optimal Brain Damage's second-order saliency (LeCun et al.
  1989, eq. 5) with the Hessian diagonal h_qq estimated by the diagonal empirical Fisher F_qq,
  the mean squared per-sequence gradient. The first-order term is dropped, as OBD does (at a
  minimum of the loss it vanishes).
* ``taylor``: s_q = |g_q · w_q|, the first-order Taylor change in loss when w_q is zeroed, with
  g the mean gradient (Molchanov et al. 2016, section 2.2, applied per weight).

How OBD here differs from Wanda: Wanda's |w_ij|·‖X_j‖ ranks exactly like w_ij²·H_jj of the
*layer-wise* proxy loss ‖WX − ŴX‖² (H = 2XXᵀ), a layer-local OBD whose Hessian is known exactly;
``obd`` takes the Hessian of the network's own loss, estimated from gradients, so a weight's
saliency includes what the rest of the network does with its output.

Worked example: W = [[1, -2], [3, 0.5]], F = [[4, 1], [0, 2]] gives OBD saliencies
[[2, 2], [0, 0.25]]; with g = [[0.5, 0.5], [-1, 1]], Taylor's are [[0.5, 1], [3, 0.5]].
"""

from __future__ import annotations

import torch

from llmprune.core.patterns import select_keep
from llmprune.methods.base import FISHER, GRADIENT, HESSIAN, Options, Result, Stats
from llmprune.methods.sparsegpt import obs_update, prepare


def obd_scores(W: torch.Tensor, stats: Stats) -> torch.Tensor:
    """½ · F ⊙ W², (out, in) like W."""
    return 0.5 * stats[FISHER].to(W.device).float() * W.float().square()


def taylor_scores(W: torch.Tensor, stats: Stats) -> torch.Tensor:
    """|g ⊙ W|, (out, in) like W."""
    return (stats[GRADIENT].to(W.device).float() * W.float()).abs()


def obd_needs(options: Options) -> set[str]:
    return {FISHER, HESSIAN} if options.update == "obs" else {FISHER}


def taylor_needs(options: Options) -> set[str]:
    return {GRADIENT, HESSIAN} if options.update == "obs" else {GRADIENT}


def prepare_stats(stats: Stats, options: Options) -> Stats:
    return prepare(stats, options) if options.update == "obs" else stats


def _prune(scores: torch.Tensor, W: torch.Tensor, stats: Stats, options: Options) -> Result:
    keep = select_keep(scores, options.pattern, options.sparsity, options.group)
    if options.update == "obs":
        return obs_update(W, stats, keep, options)
    return Result(W.float() * keep, keep)


def obd_prune(W: torch.Tensor, stats: Stats, options: Options) -> Result:
    return _prune(obd_scores(W, stats), W, stats, options)


def taylor_prune(W: torch.Tensor, stats: Stats, options: Options) -> Result:
    return _prune(taylor_scores(W, stats), W, stats, options)
