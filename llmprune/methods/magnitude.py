"""Magnitude pruning: score = |W_ij| (Han et al. 2015; the usual LLM baseline)."""

from __future__ import annotations

import torch

from llmprune.core.patterns import select_keep
from llmprune.methods.base import HESSIAN, Options, Result, Stats
from llmprune.methods.sparsegpt import obs_update, prepare


def needs(options: Options) -> set[str]:
    return {HESSIAN} if options.update == "obs" else set()


def prepare_stats(stats: Stats, options: Options) -> Stats:
    return prepare(stats, options) if options.update == "obs" else stats


def prune(W: torch.Tensor, stats: Stats, options: Options) -> Result:
    """Zero the smallest |W| (per row or per layer, or per N:M group); W is (out, in)."""
    keep = select_keep(W.abs().float(), options.pattern, options.sparsity, options.group)
    if options.update == "obs":
        return obs_update(W, stats, keep, options)
    return Result(W.float() * keep, keep)
