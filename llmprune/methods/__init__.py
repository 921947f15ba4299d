"""Pruning methods: pure functions ``prune(W, stats, options) -> Result`` plus ``needs(options)``,
the statistics they use. New methods register here; the driver never names one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from llmprune.core.patterns import Group
from llmprune.errors import LlmpruneError
from llmprune.methods import admm, loss, magnitude, ria, sparsegpt, wanda
from llmprune.methods.base import COLUMN_NORMS, FISHER, GRADIENT, HESSIAN, PER_WEIGHT, Options, Result, Stats


@dataclass(frozen=True)
class Method:
    name: str
    needs: Callable[[Options], set[str]]
    # Derived statistics computed once per shared input (e.g. the factor of H⁻¹).
    prepare: Callable[[Stats, Options], Stats]
    prune: Callable[[torch.Tensor, Stats, Options], Result]
    # Comparison group of unstructured masks by default: the reference implementation's; where
    # "global" cannot apply (N:M, another layer allocation, a schedule), "layer".
    default_group: Group
    own_update: Literal["obs", "admm"] | None = None  # the weight update that is part of the method
    # The score from the weight and its per-weight statistics alone, known before any layer is
    # pruned: what a global comparison group (every weight of every layer at once) needs.
    saliency: Callable[[torch.Tensor, Stats], torch.Tensor] | None = None

    @property
    def always_updates(self) -> bool:
        return self.own_update is not None


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", magnitude.needs, magnitude.prepare_stats, magnitude.prune, "layer",
                        saliency=lambda W, stats: W.abs().float()),
    "wanda": Method("wanda", wanda.needs, wanda.prepare_stats, wanda.prune, "row"),
    # Wanda's statistics, a score relative to the weight's row and column (llmprune.methods.ria).
    "ria": Method("ria", wanda.needs, wanda.prepare_stats, ria.prune, "row"),
    "sparsegpt": Method("sparsegpt", sparsegpt.needs, sparsegpt.prepare_stats, sparsegpt.prune, "layer", "obs"),
    # Boža 2024's gradual ADMM: the mask chosen inside the least-squares iterations.
    "admm": Method("admm", admm.needs, admm.prepare, admm.prune, "layer", "admm"),
    # Network-loss saliencies from gradients of the dense model (llmprune.methods.loss).
    # Their default group is global, OBD's own setting (and measured best on SmolLM2: README).
    "obd": Method("obd", loss.obd_needs, loss.prepare_stats, loss.obd_prune, "global", saliency=loss.obd_scores),
    "taylor": Method("taylor", loss.taylor_needs, loss.prepare_stats, loss.taylor_prune, "global",
                     saliency=loss.taylor_scores),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LlmpruneError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


__all__ = ["COLUMN_NORMS", "FISHER", "GRADIENT", "HESSIAN", "METHODS", "PER_WEIGHT", "Method", "Options", "Result",
           "get_method"]
