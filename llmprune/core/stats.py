"""Streaming statistics of a linear layer's input, accumulated in fp32 over tokens.

Each accumulator sees inputs ``x`` of shape (..., in_features) batch after batch; ``n`` counts
tokens (rows of the flattened input), so results do not depend on how the calibration set was
split into batches.
"""

from __future__ import annotations

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


class Hessian:
    """H = 2/n · XᵀX, the Hessian of the layer-wise loss ‖WX − ŴX‖² (SparseGPT, eq. 1). (in, in).

    XᵀX is symmetric, so only its upper block triangle is accumulated (bands of ``BAND`` rows:
    about 60% of the multiply-adds of the full product for in = 1536), and mirrored once at the end.
    """

    BAND = 256

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.n = 0
        self.dtype = dtype  # of each batch's product: bfloat16 rounds it once, the sum stays float32

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        for start in range(0, rows.shape[1], self.BAND):
            band = slice(start, start + self.BAND)
            if self.dtype == torch.float32:
                self.sum[band, start:].addmm_(rows[:, band].T, rows[:, start:])
            else:  # bfloat16 (about three times faster where native): one band's temporary
                self.sum[band, start:] += (rows[:, band].T @ rows[:, start:]).float()
        self.n += rows.shape[0]

    def value(self) -> torch.Tensor:
        upper = torch.triu(self.sum)
        return (upper + torch.triu(self.sum, diagonal=1).T) * (2.0 / max(self.n, 1))


class CrossDifference:
    """D = 2/n · (X_d − X_p)ᵀX_p, tokens paired: X_p the linear's inputs in the pruned model, X_d
    the dense model's inputs at the same linear for the same tokens. (in, in), not symmetric.
    With it the least-squares refit can aim at the dense model's outputs WX_d instead of WX_p:
    ‖ŴX_p − WX_d‖² has gradient Ŵ·H − W·(H + D), so D is the target's shift. Accumulated as a
    difference, not as X_dᵀX_p minus H, which would cancel most of its float32 digits."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.n = 0
        self.dtype = dtype  # of each batch's product (bfloat16: rounded once, summed in float32)

    def add(self, x: torch.Tensor, dense: torch.Tensor) -> None:
        rows, dense_rows = _rows(x), _rows(dense).to(self.sum.device)
        if rows.shape != dense_rows.shape:
            raise ValueError(f"pruned inputs {tuple(rows.shape)} and dense inputs {tuple(dense_rows.shape)} differ")
        difference = dense_rows - rows  # in float32: the rounding is then relative to the difference
        if self.dtype == torch.float32:
            self.sum.addmm_(difference.T, rows)
        else:  # by bands of Hessian.BAND rows, as the Hessian: a bounded temporary
            low, low_rows = difference.to(self.dtype), rows.to(self.dtype)
            for start in range(0, low.shape[1], Hessian.BAND):
                self.sum[start:start + Hessian.BAND] += (low[:, start:start + Hessian.BAND].T @ low_rows).float()
        self.n += rows.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))


class ColumnNorms:
    """‖X_j‖₂ over all calibration tokens, for each input feature j (Wanda's activation norm). (in,)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.sq = torch.zeros(dim, dtype=torch.float32, device=device)
        self.n = 0

    CHUNK = 4096  # rows squared at a time: bounds the temporary copy

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)
        # square().sum(0) on bounded chunks: ~10x faster on a CPU than vector_norm(dim=0), whose
        # reduction runs across the contiguous dimension.
        for chunk in rows.split(self.CHUNK):
            self.sq += chunk.square().sum(0)
        self.n += rows.shape[0]

    def value(self) -> torch.Tensor:
        return self.sq.sqrt()


MEAN_VAR = "mean_var"  # per-feature mean and variance of the input (FLAP)


class MeanVar:
    """Per-feature mean and unbiased variance over all calibration tokens. (2, in): [mean; var].

    Accumulates the sum and the sum of squares in float64, so the one-pass variance formula does
    not cancel catastrophically in the ranges activations have."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sq = torch.zeros(dim, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)
        for chunk in rows.split(ColumnNorms.CHUNK):
            chunk64 = chunk.double()
            self.sum += chunk64.sum(0)
            self.sq += chunk64.square().sum(0)
        self.n += rows.shape[0]

    def value(self) -> torch.Tensor:
        n = max(self.n, 1)
        mean = self.sum / n
        var = (self.sq - n * mean.square()) / max(self.n - 1, 1)
        return torch.stack([mean, var.clamp_min(0)]).float()


class InputSample:
    """A fixed-size, evenly strided sample of input rows, used to measure reconstruction error.

    Keeps at most ``size`` rows from each batch (callers divide their budget by the number of
    batches); cheap enough to run for every method.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, rows.shape[0] // self.size)
        # A copy, never a view: a view would keep the whole batch's activations alive.
        self.parts.append(rows[::step][: self.size].to(torch.float32, copy=True))

    def value(self) -> torch.Tensor:
        return torch.cat(self.parts)


def relative_error(w_old: torch.Tensor, w_new: torch.Tensor, sample: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² on sampled inputs X (rows): the layer's relative output error."""
    ref = sample @ w_old.float().T
    diff = sample @ (w_old.float() - w_new.float()).T
    denom = ref.square().sum().item()
    return diff.square().sum().item() / denom if denom > 0 else 0.0
