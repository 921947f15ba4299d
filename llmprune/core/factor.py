"""The one damped factorisation of a layer Hessian H = 2XᵀX/n, shared by SparseGPT's
column-by-column OBS update and the structured OBS solver.

Damping: λ = damp · mean(diag H) is added to the diagonal. The mean is over the live inputs:
a dead input (diag 0: an input that was zero on every calibration token) gets a placeholder
1.0, and counting it would make λ many times what was asked (70% of a ReLU model's inputs can
be dead). A factorisation that fails is retried with 10× more damping, up to ``DAMP_RETRIES``
times; then it stops with an error rather than silently pruning without the update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

DAMP_RETRIES = 4  # each retry multiplies the damping by 10


def live_mean(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dead inputs, the mean of diag H over the live ones). Without a dead input the mean is of
    the whole diagonal, reduced exactly as it always was (summation order moves the last digit)."""
    diagonal = H.diagonal()
    dead = diagonal == 0
    if not dead.any():
        return dead, diagonal.mean()
    live = diagonal[~dead]
    return dead, live.mean() if live.numel() else torch.ones((), dtype=H.dtype, device=H.device)


def damped_cholesky(H: torch.Tensor, damp: float, mean: torch.Tensor,
                    finish: Callable[[torch.Tensor], torch.Tensor | None], reverse: bool = False
                    ) -> tuple[torch.Tensor, float]:
    """``finish(L)`` for the lower Cholesky factor L of H + λI (of J(H + λI)J, the order
    reversed, with ``reverse``), λ = damp · ``mean``, retried with more damping while the
    factorisation fails or ``finish`` returns None. Returns (its result, the damping used).
    Memory beyond H: the damped copy, then L (the copy is freed before ``finish``)."""
    factor = damp
    for attempt in range(DAMP_RETRIES + 1):
        factor = damp * 10**attempt
        damped = H.flip(0, 1) if reverse else H.clone()
        damped.diagonal().add_(factor * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            result = finish(lower)
            del lower
            if result is not None:
                return result, factor
        log.warning("Hessian not positive definite with damping %.3g; retrying with more", factor)
    raise LlmpruneError(
        f"the Hessian stays singular even with damping {factor:.3g} x mean(diag H); "
        "use more (or more varied) calibration samples, or a larger --damp"
    )


def inverse_hessian_factor(H: torch.Tensor, damp: float, mean_diag: float | None = None) -> tuple[torch.Tensor, float]:
    """Upper triangular U with UᵀU = (H + λI)⁻¹, λ = damp · ``mean_diag`` (default: the mean of
    diag H). H: (in, in), fp32, left unchanged.

    With J the order-reversing permutation and JHJ = LLᵀ (Cholesky), U = J L⁻¹ J: one Cholesky
    and one triangular inverse instead of inverting H and factoring the inverse again. Memory
    beyond H is 2·n² at the peak (scripts/bench_factor.py measures it): JHJ with the damping added
    in place and L; then L and L⁻¹, computed in place in a column-major identity (the layout
    solve_triangular would copy its right-hand side to anyway) and turned into U by reversing
    its storage in place.
    """
    mean = H.diagonal().mean() if mean_diag is None else torch.tensor(mean_diag, dtype=H.dtype, device=H.device)

    def upper(lower: torch.Tensor) -> torch.Tensor | None:
        # Column-major, as solve_triangular would copy it anyway: solved in place.
        inverse = torch.eye(H.shape[0], dtype=H.dtype, device=H.device).t()
        torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
        reverse_in_place(inverse.t().reshape(-1))  # J L⁻¹ J: both indices reversed = the storage reversed
        # A sum is non-finite whenever an element is (without a mask the size of U).
        return inverse if torch.isfinite(inverse.sum()) or torch.isfinite(inverse).all() else None

    return damped_cholesky(H, damp, mean, upper, reverse=True)


def reverse_in_place(flat: torch.Tensor, chunk: int = 1 << 16) -> None:
    """Reverse a 1-D tensor in place, swapping mirrored chunks (temporaries of ``chunk``
    elements, not of the whole tensor)."""
    n = flat.numel()
    start = 0
    while start + chunk <= n - start - chunk:
        head = flat[start : start + chunk].clone()
        flat[start : start + chunk] = flat[n - start - chunk : n - start].flip(0)
        flat[n - start - chunk : n - start] = head.flip(0)
        start += chunk
    middle = flat[start : n - start]
    middle.copy_(middle.flip(0))


def damped_inverse(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(H + λI)⁻¹ in float64, dead inputs (diag 0) given a placeholder 1 that does not dilute λ."""
    H = H.double().clone()
    dead, mean = live_mean(H)
    H.diagonal()[dead] = 1.0
    return damped_cholesky(H, damp, mean, torch.cholesky_inverse)
