"""Pruning methods: pure functions ``prune(W, stats, options) -> Result`` plus ``needs(options)``,
the statistics they use. New methods register here; the driver never names one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from llmprune.core.patterns import Group
from llmprune.errors import LlmpruneError
from llmprune.methods import admm, magnitude, sparsegpt, wanda
from llmprune.methods.base import COLUMN_NORMS, HESSIAN, Options, Result, Stats


@dataclass(frozen=True)
class Method:
    name: str
    needs: Callable[[Options], set[str]]
    # Derived statistics computed once per shared input (e.g. the factor of H⁻¹).
    prepare: Callable[[Stats, Options], Stats]
    prune: Callable[[torch.Tensor, Stats, Options], Result]
    default_group: Group  # comparison group of unstructured masks in the reference implementation
    own_update: Literal["obs", "admm"] | None = None  # the weight update that is part of the method

    @property
    def always_updates(self) -> bool:
        return self.own_update is not None


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", magnitude.needs, magnitude.prepare_stats, magnitude.prune, "layer"),
    "wanda": Method("wanda", wanda.needs, wanda.prepare_stats, wanda.prune, "row"),
    "sparsegpt": Method("sparsegpt", sparsegpt.needs, sparsegpt.prepare_stats, sparsegpt.prune, "layer", "obs"),
    # Boža 2024's gradual ADMM: the mask chosen inside the least-squares iterations.
    "admm": Method("admm", admm.needs, admm.prepare, admm.prune, "layer", "admm"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LlmpruneError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


__all__ = ["COLUMN_NORMS", "HESSIAN", "METHODS", "Method", "Options", "Result", "get_method"]
