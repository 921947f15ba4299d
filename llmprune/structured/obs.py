"""The structured OBS solver: remove whole input-column groups of a linear (the columns of o_proj
that read one attention head, the column of down_proj that reads one MLP channel) and re-fit the
remaining columns, under the layer-wise loss ‖WX − ŴX‖² with Hessian H = 2XᵀX/n.

Removing the column set S costs E(S) = tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ) and is best compensated by

    W ← W − W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S,:     (then W_S = 0)

after which the inverse Hessian of the remaining columns is the Schur-complement downdate
H⁻¹ ← H⁻¹ − [H⁻¹]_:,S [H⁻¹]_SS⁻¹ [H⁻¹]_S,: (as in ZipLM and SlimGPT). Groups are removed greedily,
the cheapest first, each choice made on the weights and inverse as updated by the earlier ones.

Worked example: H = I. Then [H⁻¹]_S,: has zeros outside S, the update changes nothing but W_S,
and removal is plain slicing. If a removed column is an exact combination of kept ones
(x_3 = x_1 + x_2), its contribution is moved onto them exactly and the output does not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmprune.core.factor import damped_inverse
from llmprune.errors import LlmpruneError


@dataclass
class Removal:
    weight: torch.Tensor  # (out, in) updated, removed columns zero
    removed: list[int]  # group indices, in removal order
    errors: list[float]  # cumulative OBS error after each removal
    damp: float


def group_errors(W: torch.Tensor, Hinv: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """E(g) = tr(W_g [H⁻¹]_gg⁻¹ W_gᵀ) for each group (all of one size). (groups,)."""
    index = torch.tensor([list(g) for g in groups], device=W.device)  # (G, s)
    blocks = Hinv[index[:, :, None], index[:, None, :]]  # (G, s, s)
    w = W[:, index].permute(1, 0, 2)  # (G, out, s)
    solved = torch.linalg.solve(blocks, w.transpose(1, 2))  # (G, s, out)
    return (w.transpose(1, 2) * solved).sum(dim=(1, 2))


def remove_group(W: torch.Tensor, Hinv: torch.Tensor, group: Sequence[int]) -> float:
    """Remove one column group in place (W and Hinv updated); returns its OBS error."""
    S = torch.tensor(list(group), device=W.device)
    block = Hinv[S][:, S]
    rows = Hinv[S]  # (s, in)
    coeff = torch.linalg.solve(block, W[:, S].T).T  # W_S [H⁻¹]_SS⁻¹, (out, s)
    error = float((coeff * W[:, S]).sum())
    W -= coeff @ rows
    W[:, S] = 0.0
    Hinv -= rows.T @ torch.linalg.solve(block, rows)
    Hinv[S, :] = 0.0
    Hinv[:, S] = 0.0
    Hinv[S, S] = 1.0  # removed columns: inert, so later solves stay well posed
    return error


def greedy_remove(
    W: torch.Tensor, H: torch.Tensor, groups: Sequence[Sequence[int]], count: int, damp: float = 0.01,
    partition: Sequence[Sequence[int]] | None = None,
) -> Removal:
    """Remove ``count`` of ``groups`` (lists of input columns of W (out, in)) greedily by OBS error.

    ``partition`` (lists of group indices) constrains the choice: each round removes one group
    from every part, so every part loses the same number (query heads from each KV group).
    """
    work = W.double().clone()
    work[:, H.diagonal() == 0] = 0.0  # dead inputs: their weights cannot matter (as in SparseGPT)
    Hinv, used = damped_inverse(H, damp)
    removed: list[int] = []
    errors: list[float] = []
    total = 0.0
    parts = [list(p) for p in partition] if partition is not None else [list(range(len(groups)))]
    if partition is not None and count % len(parts):
        raise LlmpruneError(f"{count} groups cannot be taken evenly from {len(parts)} parts")
    while len(removed) < count:
        for part in parts:
            alive = [g for g in part if g not in removed]
            if not alive:
                raise LlmpruneError("asked to remove more groups than there are")
            scores = group_errors(work, Hinv, [groups[g] for g in alive])
            best = alive[int(scores.argmin())]
            total += remove_group(work, Hinv, groups[best])
            removed.append(best)
            errors.append(total)
            if len(removed) == count:
                break
    return Removal(work.to(W.dtype), removed, errors, used)


def greedy_remove_columns(W: torch.Tensor, H: torch.Tensor, count: int, damp: float = 0.01,
                          steps: int = 64) -> Removal:
    """Single columns (MLP channels), in at most ``steps`` rounds: each round scores the columns
    left by ‖w_j‖²/[H⁻¹]_jj on the updated weights and removes the cheapest ones jointly, with
    the exact OBS update for that set (a batched greedy, as in SlimGPT; with ``steps >= count``
    it is the one-at-a-time greedy). ``errors`` is interpolated linearly inside a round."""
    work = W.double().clone()
    work[:, H.diagonal() == 0] = 0.0  # dead inputs: their weights cannot matter (as in SparseGPT)
    Hinv, used = damped_inverse(H, damp)
    alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    removed: list[int] = []
    errors: list[float] = []
    total = 0.0
    per_round = max(1, -(-count // max(1, steps)))
    while len(removed) < count:
        scores = work.square().sum(0) / Hinv.diagonal().clamp_min(1e-300)
        scores[~alive] = float("inf")
        take = scores.topk(min(per_round, count - len(removed)), largest=False).indices.sort().values.tolist()
        before = total
        total += remove_group(work, Hinv, take)
        alive[take] = False
        removed.extend(take)
        errors.extend(before + (total - before) * (i + 1) / len(take) for i in range(len(take)))
    return Removal(work.to(W.dtype), removed, errors, used)
