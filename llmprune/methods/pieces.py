"""One weight matrix through the pieces a configuration names, in order:

1. the method's mask (with its own update, if it has one: SparseGPT's OBS, ADMM's refit);
2. ``refine``: the mask refined (DSnoT), from the dense weights;
3. ``update``: the kept weights refit on the final mask from the dense weights (OBS or the
   least-squares ADMM refit), unless the method's own update already did exactly that.

Without a refinement and with the method's own update (or none), this is the method alone, bit
for bit: the pieces only add work when asked for.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llmprune.methods import Method, admm, dsnot
from llmprune.methods.base import DAMPED, FACTOR, HESSIAN, Options, Result, Stats
from llmprune.methods.sparsegpt import obs_update
from llmprune.methods.sparsegpt import prepare as obs_prepare


def mask_options(method: Method, options: Options) -> Options:
    """What the method itself is given: its own update, or none (a later piece refits)."""
    return replace(options, update=method.own_update or "none", refine="none")


def alone(method: Method, options: Options) -> bool:
    """Whether the method alone does all that is asked (the mask-only methods apply the OBS
    update themselves)."""
    if options.refine != "none":
        return False
    if method.own_update is not None:
        return options.update == method.own_update
    return options.update in ("none", "obs")


def needs(method: Method, options: Options) -> set[str]:
    if alone(method, options):
        return method.needs(options)
    kinds = set(method.needs(mask_options(method, options)))
    if options.refine == "dsnot":
        kinds |= dsnot.needs(options)
    if options.update == "obs":
        kinds.add(HESSIAN)
    if options.update == "admm":
        kinds |= admm.needs(options)
    return kinds


def prepare(method: Method, stats: Stats, options: Options) -> Stats:
    """Statistics derived once per shared input, for the method and for the update."""
    if alone(method, options):
        return method.prepare(stats, options)
    stats = method.prepare(stats, mask_options(method, options))
    if options.update == "obs" and FACTOR not in stats:
        stats = obs_prepare(stats, options)
    if options.update == "admm" and DAMPED not in stats:
        stats = admm.prepare(stats, options)
    return stats


def prune(method: Method, W: torch.Tensor, stats: Stats, options: Options) -> Result:
    if alone(method, options):
        return method.prune(W, stats, options)
    first = method.prune(W, stats, mask_options(method, options))
    keep = first.keep
    if options.refine == "dsnot":
        keep = dsnot.refine(W, stats, keep, options)
    if options.update == method.own_update and torch.equal(keep, first.keep):
        return first  # the method's own update already refit on this very mask
    if options.update == "obs":
        return obs_update(W, stats, keep, options)
    if options.update == "admm":  # from the method's own answer when it is on this mask
        return admm.refit(W, stats, keep, options, first.weight if torch.equal(keep, first.keep) else None)
    return Result(W.float() * keep, keep, first.damp_used)
