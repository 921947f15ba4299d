"""SparseGPT: blocked Optimal Brain Surgeon with lazy updates (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", Algorithm 1).

Pruning weight q of a row w under the layer-wise loss ‖wX − ŵX‖² with Hessian H = 2XᵀX/n
costs w_q² / [H⁻¹]_qq and is best compensated by δw = −(w_q / [H⁻¹]_qq) · H⁻¹_{:,q}. Processing
columns left to right with the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) turns the sequence of
such updates into: for column j, err = (w_j − q_j)/U_jj, then w_{j:} −= err · U_{j,j:}. Updates
inside a block of ``blocksize`` columns are applied eagerly, those to later columns lazily once
per block (a matrix product), which is what makes it fast.

Worked example: H = I (inputs independent, unit variance), W = [[1, 2]], prune column 0.
U = I/√(1+λ), err = 1·√(1+λ), and the update to column 1 is err·U_01 = 0, so W becomes
[[0, 2]]: with uncorrelated inputs OBS reduces to plain masking. With correlated inputs the kept
columns absorb what the pruned ones contributed (a least-squares refit).

Hessian shrinkage (``shrink``, default 0.1): the solve uses (1 − shrink)·H + shrink·diag(H); see
:func:`shrink_to_diagonal`. This is not in the paper; 0 gives its algorithm exactly.

Mask choice: for unstructured sparsity the mask of each block is chosen on the weights *as
updated so far* by the OBS score w²/[U_jj]² (adaptive mask selection, section 3.3); for N:M the
choice is made every M columns, again on the updated weights. A fixed mask (Wanda's, say) can be
passed instead; then only the weight update runs (``--update obs``).
"""

from __future__ import annotations

import itertools
import logging
import math

import torch

from llmprune.core.factor import inverse_hessian_factor, live_mean
from llmprune.core.patterns import keep_nm, lowest_mask, prune_count
from llmprune.methods.base import DAMP_USED, DEAD, FACTOR, HESSIAN, Options, Result, Stats

log = logging.getLogger(__name__)

def needs(options: Options) -> set[str]:
    return {HESSIAN}


def prepare_stats(stats: Stats, options: Options) -> Stats:
    return prepare(stats, options)


def shrink_to_diagonal(H: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 − shrink)·H + shrink·diag(H), a new tensor: off-diagonal entries scaled by 1 − shrink,
    diagonal kept.

    The OBS update moves a pruned weight's contribution onto kept weights whose inputs are
    correlated with its input; the off-diagonal of H is where a few thousand calibration tokens,
    from one domain, are least reliable. Shrinking them (a covariance-shrinkage estimate toward
    the diagonal target, as in Schäfer & Strimmer 2005) keeps the per-input energies exact and
    tempers the update. Worked example: H = [[1, 0.8], [0.8, 1]], shrink 0.5 → [[1, 0.4], [0.4, 1]];
    pruning w_0 moves 0.4·w_0 instead of 0.8·w_0 onto w_1. shrink 1 leaves a diagonal H: no
    update, and the OBS score w²/[H⁻¹]_jj becomes w²·H_jj, Wanda's score squared.
    """
    if shrink == 0:
        return H.clone()
    diagonal = H.diagonal().clone()
    shrunk = H * (1.0 - shrink)
    shrunk.diagonal().copy_(diagonal)
    return shrunk


def prepare(stats: Stats, options: Options) -> Stats:
    """Once per shared input: zero-input ("dead") columns and the factor U of the damped H⁻¹
    (of the Hessian shrunk toward its diagonal by ``options.shrink``)."""
    H = shrink_to_diagonal(stats[HESSIAN].float(), options.shrink)
    dead, mean = live_mean(H)  # λ from the live inputs' energy (see llmprune.core.factor)
    H.diagonal()[dead] = 1.0
    U, damp_used = inverse_hessian_factor(H, options.damp, float(mean) if dead.any() else None)
    return {**stats, DEAD: dead, FACTOR: U, DAMP_USED: torch.tensor(damp_used)}


def _solve(W: torch.Tensor, stats: Stats, options: Options, keep: torch.Tensor | None) -> Result:
    if FACTOR not in stats:
        stats = prepare(stats, options)
    U = stats[FACTOR]  # (in, in), upper
    W = W.float().clone()  # (out, in)
    rows, cols = W.shape
    # A later step of a schedule: the zeros of the earlier steps stay pruned. Updates from earlier
    # blocks move them off zero before their own block is chosen, so they are pinned by score.
    pinned = W == 0 if options.keep_zeros else None
    # Inputs that are always zero carry no information: their weights cannot matter on the
    # calibration data, so they are zeroed (and, scoring 0, pruned first).
    W[:, stats[DEAD]] = 0.0

    pattern = options.pattern
    choose = keep is None
    nm = choose and pattern.kind == "nm"
    # N:M masks are chosen every M columns on the weights updated so far, so blocks hold whole
    # groups; unstructured masks are chosen once per block. The fixed-mask solve then runs in
    # small steps (see _step_errors) with the rest of the block updated by matrix products.
    step = pattern.m if nm else SOLVE_STEP
    blocksize = max(pattern.m, options.blocksize // pattern.m * pattern.m) if nm else options.blocksize
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.clone()

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = W[:, start:end].clone()  # (out, b), updated eagerly
        Ub = U[start:end, start:end]  # (b, b)
        errors = torch.zeros_like(block)
        if choose and not nm:
            scores = block.square() / Ub.diagonal().square()
            if pinned is not None:
                scores[pinned[:, start:end]] = -1.0  # below every real score: pruned first
            keep[:, start:end] = _block_keep(scores, start, end, rows, options)
        for c0 in range(0, end - start, step):
            c1 = min(c0 + step, end - start)
            Uc = Ub[c0:c1, c0:c1]
            if nm:
                keep[:, start + c0 : start + c1] = keep_group(block[:, c0:c1], Uc, pattern.n, options.nm_select)
            kept = keep[:, start + c0 : start + c1]
            err = _step_errors(block[:, c0:c1], Uc, ~kept)
            block[:, c0:c1] = (block[:, c0:c1] - err @ Uc) * kept
            block[:, c1:] -= err @ Ub[c0:c1, c1:]
            errors[:, c0:c1] = err
        W[:, start:end] = block
        W[:, end:] -= errors @ U[start:end, end:]
    return Result(W, keep, float(stats[DAMP_USED]))


SOLVE_STEP = 16  # columns per batched triangular solve: small systems, the rest as GEMMs
ROW_CHUNK = 8192  # rows solved together, bounding the (rows, step, step) system


def _step_errors(w: torch.Tensor, Uc: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """OBS errors of a few columns with a fixed mask, for all rows at once. (out, c).

    Column by column the algorithm sets err_j = p_j · (w_j − Σ_{i<j} err_i U_ij) / U_jj, with
    p_j = 1 for pruned weights (kept ones have err_j = 0). That recursion is the triangular
    system (D + diag(p) · L) err = p ∘ w, with D = diag(U) and L the strictly lower part of Uᵀ;
    each row has its own mask, hence a batched solve instead of a Python loop over columns.
    """
    p = pruned.to(w.dtype)  # (out, c)
    lower = torch.tril(Uc.T, diagonal=-1)  # (c, c)
    diag = torch.diag_embed(Uc.diagonal())  # (c, c)
    errs = []
    for r0 in range(0, w.shape[0], ROW_CHUNK):
        pr = p[r0 : r0 + ROW_CHUNK]
        system = diag + pr[:, :, None] * lower  # (rows, c, c), lower triangular
        rhs = (pr * w[r0 : r0 + ROW_CHUNK])[:, :, None]
        errs.append(torch.linalg.solve_triangular(system, rhs, upper=False)[:, :, 0])
    return torch.cat(errs)


JOINT_LIMIT = 70  # candidate masks per group (4:8 has 70); beyond it masks use per-weight scores


def keep_group(w: torch.Tensor, Uc: torch.Tensor, n: int, select: str = "joint") -> torch.Tensor:
    """Keep mask (rows, m) of one N:M group of columns, chosen on the current weights ``w``.

    "score" ranks weights one by one by w²/U_jj² (the reference code). "joint" picks, per row,
    the set S of pruned columns with the least OBS error for the group as a whole: pruning S
    (columns in order, each update passed on to the later ones) costs ‖w_S U_SS⁻¹‖², since the
    recursion err_j = (w_j − Σ_{i<j, i∈S} err_i U_ij)/U_jj is the triangular system err_S U_SS =
    w_S. Per-weight scores ignore how the pruned weights of a group interact, so they can miss
    the cheapest set; "joint" never does worse on the group. Used when C(m, n) <= JOINT_LIMIT.
    """
    m = w.shape[1]
    if select == "score" or math.comb(m, n) > JOINT_LIMIT:
        return keep_nm(w.square() / Uc.diagonal().square(), n, m)
    candidates = torch.tensor(list(itertools.combinations(range(m), m - n)), device=w.device)  # (C, k)
    U_SS = Uc[candidates[:, :, None], candidates[:, None, :]]  # (C, k, k), upper triangular
    eye = torch.eye(m - n, dtype=Uc.dtype, device=Uc.device).expand_as(U_SS)
    inverse = torch.linalg.solve_triangular(U_SS, eye, upper=True)  # (C, k, k)
    errors = torch.einsum("rck,ckj->rcj", w[:, candidates], inverse)  # (rows, C, k)
    best = errors.square().sum(-1).argmin(dim=1)  # (rows,)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, candidates[best], False)
    return keep


def _block_keep(scores: torch.Tensor, start: int, end: int, rows: int, options: Options) -> torch.Tensor:
    """Unstructured keep mask of columns [start, end) from OBS scores w²/U_jj². Counts use
    cumulative rounding, so the whole matrix gets exactly floor(total · sparsity) zeros (per
    row, or per layer)."""
    s = options.sparsity
    if options.group == "row":
        return ~lowest_mask(scores, prune_count(end, s) - prune_count(start, s))
    count = prune_count(rows * end, s) - prune_count(rows * start, s)
    return ~lowest_mask(scores.reshape(1, -1), count).reshape(scores.shape)


def prune(W: torch.Tensor, stats: Stats, options: Options) -> Result:
    """SparseGPT with adaptive mask selection. W: (out, in); stats[HESSIAN]: (in, in)."""
    return _solve(W, stats, options, keep=None)


def obs_update(W: torch.Tensor, stats: Stats, keep: torch.Tensor, options: Options) -> Result:
    """Zero the weights outside ``keep`` and re-fit the rest with the OBS update."""
    return _solve(W, stats, options, keep=keep)
