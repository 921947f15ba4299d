"""Sparsity patterns: turn importance scores into a ``keep`` mask (True = weight kept).

Conventions used everywhere in llmprune:

* ``sparsity`` is the fraction of weights set to zero.
* ``"N:M"`` means **N kept in every M** consecutive weights of a row (so ``2:4`` keeps 2 and
  zeroes 2: 50% sparsity, the layout of NVIDIA's sparse tensor cores).
* Scores are "higher = more important"; the lowest scores are pruned.

Ties are broken deterministically: among equal scores the weight with the lower column index is
pruned first (a stable sort), so vectorised selectors and the naive references in the tests agree
exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from llmprune.errors import LlmpruneError

# "global": one group over every matrix of the model, resolved by the driver into one count each
Group = Literal["row", "layer", "global"]


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go. ``kind`` is ``"unstructured"`` or ``"nm"`` (N kept of every M)."""

    kind: Literal["unstructured", "nm"] = "unstructured"
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind == "nm" and not (0 < self.n < self.m):
            raise LlmpruneError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")
        if self.kind not in ("unstructured", "nm"):
            raise LlmpruneError(f"unknown pattern kind {self.kind!r}")

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """``"unstructured"`` or ``"N:M"`` (N kept in every M), e.g. ``"2:4"``."""
        text = text.strip().lower()
        if text == "unstructured":
            return cls("unstructured")
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise LlmpruneError(
                f"pattern {text!r} is not 'unstructured' or 'N:M' (N kept in every M, e.g. 2:4)"
            )
        return cls("nm", int(match.group(1)), int(match.group(2)))

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes (1 - N/M); None for unstructured."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else "unstructured"


def prune_count(total: int, sparsity: float) -> int:
    """Number of weights to zero out of ``total`` (floor, robust to float noise)."""
    return math.floor(total * sparsity + 1e-9)


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest entries along the last dim; among equal scores the lower
    index goes first (what a stable sort gives), found with a selection instead of a sort."""
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if count >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(count, dim=-1, keepdim=True).values
    below = scores < threshold
    at = scores == threshold
    room = count - below.sum(-1, keepdim=True)  # how many of the tied entries still go
    lowest = below | at
    # Usually every entry equal to the threshold goes (it is one entry); only rows with more
    # ties than room need the (costly, full-width) running count.
    over = (at.sum(-1, keepdim=True) > room).squeeze(-1)
    if bool(over.any()):
        tied = at[over]
        lowest[over] = below[over] | (tied & (tied.cumsum(-1) <= room[over]))
    return lowest


def keep_unstructured(scores: torch.Tensor, sparsity: float, group: Group = "row") -> torch.Tensor:
    """Keep mask pruning ``sparsity`` of the weights with the lowest scores.

    ``group="row"`` compares weights within each output row (Wanda, section 3); ``"layer"``
    compares all weights of the matrix (classic magnitude pruning).
    """
    rows, cols = scores.shape
    if group == "row":
        return ~lowest_mask(scores, prune_count(cols, sparsity))
    if group != "layer":  # "global" is resolved by the driver into one count per matrix
        raise ValueError(f"comparison group {group!r} is not one matrix's; use row or layer here")
    flat = scores.reshape(1, -1)
    return ~lowest_mask(flat, prune_count(rows * cols, sparsity)).reshape(rows, cols)


def keep_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise LlmpruneError(f"width {cols} is not divisible by M={m}")
    grouped = scores.reshape(rows, cols // m, m)
    return ~lowest_mask(grouped, m - n).reshape(rows, cols)


def select_keep(scores: torch.Tensor, pattern: Pattern, sparsity: float, group: Group) -> torch.Tensor:
    """Dispatch to the selector of ``pattern``."""
    if pattern.kind == "nm":
        return keep_nm(scores, pattern.n, pattern.m)
    return keep_unstructured(scores, sparsity, group)


def global_prune_counts(scores: Sequence[torch.Tensor], sparsity: float) -> list[int]:
    """How many entries of each score tensor to prune so that ``sparsity`` of all entries
    together go, lowest scores first: one comparison group spanning every tensor (global
    magnitude; OBD's own setting). Ties at the threshold go in order, earlier tensors and lower
    indices first, as a stable sort of the concatenation would; pruning each tensor's ``count``
    lowest (:func:`lowest_mask` on its flattening) then prunes exactly that sorted prefix.

    Scores must be finite and >= 0, so their float32 bit patterns, read as integers, sort like
    the values: the threshold is found by bisection on those integers (exact, 31 counting
    passes, no concatenated copy). Worked example: scores [[3, 1], [2, 2, 0]] at 60% prune 3 of
    5: sorted 0, 1, 2, 2, 3, so the threshold is 2, one tied 2 goes: counts [1, 2].
    """
    flats = [s.detach().float().reshape(-1) + 0.0 for s in scores]  # + 0.0: -0.0 becomes +0.0
    for flat in flats:
        if flat.numel() and not (bool(torch.isfinite(flat).all()) and float(flat.min()) >= 0):
            raise LlmpruneError("global pruning needs finite scores >= 0")
    bits = [flat.view(torch.int32) for flat in flats]
    total = sum(b.numel() for b in bits)
    k = prune_count(total, sparsity)
    if k <= 0:
        return [0] * len(bits)
    lo, hi = 0, 0x7F800000  # +0.0 and +inf: the smallest threshold with at least k at or below
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(int((b <= mid).sum()) for b in bits) >= k:
            hi = mid
        else:
            lo = mid + 1
    below = [int((b < lo).sum()) for b in bits]
    room = k - sum(below)
    counts = []
    for b, under in zip(bits, below, strict=True):
        tied = min(room, int((b == lo).sum()))
        room -= tied
        counts.append(under + tied)
    return counts
