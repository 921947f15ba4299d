"""Frozen, validated configuration objects. Plain data only: no tensors, no runtime state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from llmprune.core.patterns import Pattern
from llmprune.errors import LlmpruneError
from llmprune.methods import Options, get_method

DEFAULT_SPARSITY = 0.5  # unstructured pruning without a sparsity


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    * ``method``: ``magnitude``, ``wanda`` or ``sparsegpt``.
    * ``pattern``: ``"unstructured"`` or ``"N:M"`` (N kept in every M consecutive weights).
    * ``sparsity``: fraction of zeros in [0, 1). ``None`` (default): the pattern's own for N:M
      (2:4 = 0.5, 1:4 = 0.75), 0.5 for unstructured.
    * ``group``: comparison group of unstructured masks, ``"row"`` or ``"layer"``
      (default: the method's reference choice: magnitude and SparseGPT per layer, Wanda per row).
    * ``update``: ``"obs"`` re-fits kept weights with SparseGPT's OBS update after any mask;
      default ``"obs"`` for SparseGPT, ``"none"`` otherwise.
    * ``blocksize``, ``damp``: SparseGPT's lazy-update block width and dampening, as a fraction of
      mean(diag H).
    * ``shrink`` (default 0.1): the OBS solve uses (1 − shrink)·H + shrink·diag(H), shrinking the
      calibration inputs' correlations toward zero while keeping their variances. The update
      leans on those correlations, which few (or off-domain) calibration tokens estimate worst;
      0 is the plain SparseGPT Hessian, 1 leaves no update at all (a Wanda-like w²·H_jj mask).
    * ``nm_select``: how SparseGPT picks each N:M group: ``joint`` (default: the pruned set with
      the least OBS error of the group as a whole) or ``score`` (per-weight w²/[H⁻¹]_jj, as
      the reference code).
    * ``sequential`` (default True): true-sequential pruning inside a decoder layer: each group
      of linears that shares an input (q/k/v → o → gate/up → down) is pruned from inputs that
      already pass through the pruned earlier groups. False prunes every linear from the dense
      layer's statistics, as the reference implementations do.
    * ``allow_partial`` (default False): prune the linear layers even when the decoder layers
      also hold weight matrices no method can prune (fused mixture-of-experts weights); without
      it such a model is refused before any work. The report then gives both sparsities.
    """

    method: str = "sparsegpt"
    pattern: str = "unstructured"
    sparsity: float | None = None
    group: Literal["row", "layer"] | None = None
    update: Literal["none", "obs"] | None = None
    blocksize: int = 128
    damp: float = 0.01
    sequential: bool = True
    nm_select: Literal["joint", "score"] = "joint"
    shrink: float = 0.1
    allow_partial: bool = False

    def __post_init__(self) -> None:
        method = get_method(self.method)
        pattern = Pattern.parse(self.pattern)
        implied = pattern.implied_sparsity
        if self.sparsity is None:
            pass
        elif not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity)
                  and 0 <= self.sparsity < 1):
            raise LlmpruneError(f"sparsity must be in [0, 1) (the fraction of zeros), got {self.sparsity}")
        elif implied is not None and abs(implied - self.sparsity) > 1e-9:
            raise LlmpruneError(
                f"pattern {pattern} keeps {pattern.n} of every {pattern.m} weights (sparsity "
                f"{implied:g}), which contradicts sparsity {self.sparsity:g}"
            )
        if self.group not in (None, "row", "layer"):
            raise LlmpruneError(f"group must be 'row' or 'layer', got {self.group!r}")
        if self.update not in (None, "none", "obs"):
            raise LlmpruneError(f"update must be 'none' or 'obs', got {self.update!r}")
        if method.always_updates and self.update == "none":
            raise LlmpruneError(f"{method.name} always applies the OBS update; drop update='none'")
        if not (isinstance(self.blocksize, int) and self.blocksize > 0):
            raise LlmpruneError(f"blocksize must be a positive integer, got {self.blocksize}")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise LlmpruneError(f"damp must be a positive fraction of mean(diag H), got {self.damp}")
        if not (isinstance(self.shrink, (int, float)) and 0 <= self.shrink <= 1):
            raise LlmpruneError(f"shrink must be in [0, 1] (0: the plain Hessian), got {self.shrink}")
        if self.nm_select not in ("joint", "score"):
            raise LlmpruneError(f"nm_select must be 'joint' or 'score', got {self.nm_select!r}")

    @property
    def target_sparsity(self) -> float:
        implied = Pattern.parse(self.pattern).implied_sparsity
        if implied is not None:
            return implied
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    def options(self) -> Options:
        """The per-matrix options handed to the method."""
        method = get_method(self.method)
        update = self.update or ("obs" if method.always_updates else "none")
        return Options(
            pattern=Pattern.parse(self.pattern),
            sparsity=self.target_sparsity,
            group=self.group or method.default_group,
            update=update,
            blocksize=self.blocksize,
            damp=self.damp,
            nm_select=self.nm_select,
            shrink=float(self.shrink),
        )


@dataclass(frozen=True)
class CalibrationConfig:
    """``source``: a built-in text (``wikipedia``, ``pydoc``), a datasets name (``wikitext2``,
    ``c4``, ``ptb``) or a local ``.txt``/``.jsonl`` file. ``seqlen`` None = min(2048, model limit)."""

    source: str = "wikipedia"
    samples: int = 128
    seqlen: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.samples, int) and self.samples > 0):
            raise LlmpruneError(f"calibration samples must be a positive integer, got {self.samples}")
        if self.seqlen is not None and not (isinstance(self.seqlen, int) and self.seqlen > 1):
            raise LlmpruneError(f"seqlen must be an integer > 1, got {self.seqlen}")
