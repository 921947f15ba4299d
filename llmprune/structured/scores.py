"""Importance of attention heads and MLP channels for the one-shot baselines (lower = removed
first). Each works on one "unit": the rows the unit owns in q/k/v or gate/up plus the input
columns it owns in o or down (:class:`Unit`).

* ``magnitude``: L1 norm of all the unit's weights (Li et al., "Pruning Filters for Efficient
  ConvNets").
* ``wanda-sp``: Σ |W_ij| · ‖X_j‖₂ over the unit's input columns j of o/down (Wanda adapted to
  structures, as compared against in the FLAP paper).
* ``flap``: the fluctuation Σ_j Var(X_j) · ‖W_:,j‖² over those columns (An et al., "Fluctuation-
  based Adaptive Structured Pruning"); the removed columns' mean contribution W_:,S · E[X_S] is
  then added to the output bias.
* ``taylor``: (Σ_w w · ∂L/∂w)² over all the unit's weights, with L the calibration language-model
  loss of the dense model (first-order Taylor, Molchanov et al. 2019; LLM-Pruner's "vector" form).
* ``obd``: Σ_w ½ · F_ww · w² over all the unit's weights, F the diagonal empirical Fisher of the
  same loss (Optimal Brain Damage's saliency summed over the unit, as if its weights were
  independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.core.stats import MEAN_VAR
from llmprune.methods.base import COLUMN_NORMS

SCORES = ("obs", "magnitude", "wanda-sp", "flap", "taylor", "obd")
GRADIENT_SCORES = ("taylor", "obd")  # from gradients of the network loss (llmprune.engine.gradients)
EXPERT_SCORES = ("reap", "reap-sum", "frequency", "random")  # pattern experts (llmprune.structured.experts)
STATS_OF = {"obs": {"hessian"}, "magnitude": set(), "wanda-sp": {COLUMN_NORMS}, "flap": {MEAN_VAR}, "taylor": set(),
            "obd": set()}


@dataclass
class Unit:
    """What one head (or KV group, or channel) owns: rows per linear name, columns of the output
    projection."""

    rows: dict[str, list[int]]
    columns: list[int]


def unit_scores(
    score: str, units: list[Unit], weights: dict[str, torch.Tensor], out_name: str,
    stats: dict[str, torch.Tensor], grads: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
) -> torch.Tensor:
    """(units,) importances. ``weights``: (out, in) fp32 tensors by linear name; ``grads``: the
    (mean gradient, Fisher) pair of each, (out, in) as well."""
    W = weights[out_name]
    values = []
    for unit in units:
        cols = torch.tensor(unit.columns)
        if score == "magnitude":
            total = W[:, cols].abs().sum() + sum(weights[n][rows].abs().sum() for n, rows in unit.rows.items())
        elif score == "wanda-sp":
            total = (W[:, cols].abs() * stats[COLUMN_NORMS][cols]).sum()
        elif score == "flap":
            total = (W[:, cols].square().sum(0) * stats[MEAN_VAR][1][cols]).sum()
        elif score == "taylor":
            assert grads is not None
            first = (W[:, cols] * grads[out_name][0][:, cols]).sum()
            first = first + sum((weights[n][rows] * grads[n][0][rows]).sum() for n, rows in unit.rows.items())
            total = first.square()
        elif score == "obd":
            assert grads is not None
            total = 0.5 * (W[:, cols].square() * grads[out_name][1][:, cols]).sum()
            total = total + sum(0.5 * (weights[n][rows].square() * grads[n][1][rows]).sum()
                                for n, rows in unit.rows.items())
        else:
            raise ValueError(f"no one-shot score {score!r}")
        values.append(torch.as_tensor(total, dtype=torch.float64))
    return torch.stack(values)
