"""Least-squares weight updates on a fixed support: ADMM, then conjugate gradients.

Once a mask is chosen, the best kept weights of one row w (input Hessian H, dense row w₀) solve

    min ½ (w − w₀) H (w − w₀)ᵀ   subject to   w_j = 0 off the support,

a least-squares problem per row, which SparseGPT's one-pass OBS update only approximates (its
updates of later columns never revisit earlier ones). Solving it exactly per row costs a
|S|×|S| factorisation per row; instead, for all rows at once:

* **ADMM** (Boža 2024, "Fast and Optimal Weight Update for Pruned Large Language Models"):
  split w = z with z on the support; iterate w ← (w₀H + ρ(z − v))(H + ρI)⁻¹, z ← (w + v)⊙keep,
  v ← v + w − z, with ρ growing (ρ·``RHO_GROWTH`` every ``RHO_STEP`` iterations) so z and w meet.
  The ``admm`` method also chooses the mask inside the iterations, its sparsity raised
  gradually (cubic schedule) by the score |w + v|·√H_jj, as that paper's gradual variant.
* **Conjugate gradients on the support** (as ALPS's final refit, Meng et al. 2024), started from
  ADMM's z, preconditioned by diag(H): the exact minimiser up to the iterations' tolerance, and
  pruned weights stay exactly zero because every search direction is masked.

H is the OBS update's own matrix: shrunk toward its diagonal by ``shrink`` and damped by
``damp``·mean(diag H), so the choice of update changes the solver, not the objective. Worked
example: H = [[2, 1], [1, 2]], w₀ = [1, 1], keep only column 1: the minimiser is
w₁ = (H w₀)₁ / H₁₁ = 3/2, w = [0, 1.5] (the kept weight absorbs half of the pruned one, which
its input's correlation 1/2 says it should).
"""

from __future__ import annotations

import torch

from llmprune.core.factor import live_mean
from llmprune.core.patterns import keep_unstructured, select_keep
from llmprune.methods.base import CROSS, DAMP_USED, DAMPED, DEAD, HESSIAN, SHIFT, Options, Result, Stats
from llmprune.methods.sparsegpt import shrink_to_diagonal

RHO_START = 0.1  # ρ as a fraction of mean(diag H)
RHO_GROWTH = 1.3
RHO_STEP = 3  # iterations per ρ
GRADUAL_SHARE = 0.8  # of the ADMM iterations, the first this share raise the sparsity
ITERATIONS = 20  # ADMM iterations from a plain mask (admm_iterations None)


def needs(options: Options) -> set[str]:
    return {HESSIAN, CROSS} if options.model_target > 0 else {HESSIAN}


def prepare(stats: Stats, options: Options) -> Stats:
    """Once per shared input: the shrunk, damped H (dead inputs get a unit diagonal: their
    weights are zeroed, see :func:`refit`)."""
    H = shrink_to_diagonal(stats[HESSIAN].float(), options.shrink)
    dead, mean = live_mean(H)
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(options.damp * float(mean))
    shift = {}
    if options.model_target > 0 and CROSS in stats:
        # The cross term scaled as the shrinkage scales H's off-diagonal part: the pull toward
        # the dense model is tempered with the correlations it rests on.
        shift[SHIFT] = stats[CROSS].float() * (options.model_target * (1.0 - options.shrink))
    return {**stats, DEAD: dead, DAMPED: H, DAMP_USED: torch.tensor(options.damp), **shift}


def _inverse(H: torch.Tensor, rho: float) -> torch.Tensor:
    shifted = H.clone()
    shifted.diagonal().add_(rho)
    return torch.cholesky_inverse(torch.linalg.cholesky(shifted))


def admm(W0: torch.Tensor, H: torch.Tensor, keep: torch.Tensor | None, options: Options,
         iterations: int, start: torch.Tensor | None = None,
         extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights on the support, the support). ``keep`` None: chosen inside the iterations
    (the sparsity rises to ``options.sparsity`` over the first ``GRADUAL_SHARE`` of them; the
    last projections use ``options.pattern``). ``start``: weights on ``keep`` to start from
    (default: the dense ones, masked). ``extra``: added to w₀H, the objective's linear term
    (the refit's target shift, :data:`SHIFT`, times w₀)."""
    G = W0 @ H if extra is None else W0 @ H + extra
    scale = float(H.diagonal().mean())
    norms = H.diagonal().sqrt()[None, :]
    pinned = W0 == 0 if options.keep_zeros else None  # a later schedule step: earlier zeros stay
    gradual = keep is None
    support = torch.ones_like(W0, dtype=torch.bool) if keep is None else keep
    Z, V = (W0 if start is None else start.float()) * support, torch.zeros_like(W0)
    inverse, rho = None, 0.0
    ramp = max(1, int(iterations * GRADUAL_SHARE))
    for k in range(iterations):
        if k % RHO_STEP == 0:
            previous, rho = rho, RHO_START * scale * RHO_GROWTH ** (k // RHO_STEP)
            if previous:  # v is the dual over ρ: it scales when ρ does
                V.mul_(previous / rho)
            inverse = _inverse(H, rho)
        assert inverse is not None
        W = torch.sub(Z, V).mul_(rho).add_(G) @ inverse  # (w₀H + ρ(z − v))(H + ρI)⁻¹
        U = W.add_(V)  # w + v (W is not needed again)
        if gradual:
            support = _gradual_keep(_pin(U.abs().mul_(norms), pinned), options, min(1.0, (k + 1) / ramp))
        Z = U * support
        V = U.sub_(Z)  # v + w − z
    if gradual and iterations == 0:
        support = select_keep(_pin(W0.abs() * norms, pinned), options.pattern, options.sparsity, options.group)
        Z = W0 * support
    return Z, support


def _pin(scores: torch.Tensor, pinned: torch.Tensor | None) -> torch.Tensor:
    """Scores with the pinned entries below every real one (pruned first)."""
    return scores if pinned is None else scores.masked_fill_(pinned, -1.0)


def _gradual_keep(scores: torch.Tensor, options: Options, progress: float) -> torch.Tensor:
    """The support at ``progress`` (0..1] of the ramp: unstructured at the cubic schedule's
    sparsity s·(1 − (1 − progress)³) until the end, then the target pattern itself."""
    if progress >= 1.0:
        return select_keep(scores, options.pattern, options.sparsity, options.group)
    sparsity = options.sparsity * (1.0 - (1.0 - progress) ** 3)
    return keep_unstructured(scores, sparsity, options.group if options.pattern.kind != "nm" else "row")


def conjugate_gradient(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor, keep: torch.Tensor,
                       iterations: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise ½(w − w₀)H(w − w₀)ᵀ − w·extraᵀ over the support of ``keep``, each row its own
    problem, from ``W`` (already zero off the support). Preconditioned by diag(H); the search
    directions are masked, so the zeros stay exactly zero."""
    mask = keep.to(W.dtype)
    W = W * mask
    inverse_diagonal = 1.0 / H.diagonal()[None, :]
    R = (W0 - W) @ H if extra is None else (W0 - W) @ H + extra
    R = R * mask  # the negative gradient on the support
    Y = R * inverse_diagonal
    D = Y.clone()
    ry = (R * Y).sum(1, keepdim=True)
    tiny = torch.finfo(W.dtype).tiny
    for _ in range(iterations):
        HD = (D @ H) * mask
        curvature = (D * HD).sum(1, keepdim=True)
        alpha = torch.where(curvature > tiny, ry / curvature.clamp_min(tiny), torch.zeros_like(ry))
        W = W + alpha * D
        R = R - alpha * HD
        Y = R * inverse_diagonal
        ry_next = (R * Y).sum(1, keepdim=True)
        beta = torch.where(ry > tiny, ry_next / ry.clamp_min(tiny), torch.zeros_like(ry))
        D = Y + beta * D
        ry = ry_next
    return W * mask


def refit(W: torch.Tensor, stats: Stats, keep: torch.Tensor | None, options: Options,
          start: torch.Tensor | None = None) -> Result:
    """The least-squares weights on ``keep`` (None: chosen gradually inside ADMM), from
    ``start`` when given (another update's answer on the same mask: a head start)."""
    if DAMPED not in stats:
        stats = prepare(stats, options)
    H = stats[DAMPED]
    W0 = W.float().clone()
    W0[:, stats[DEAD]] = 0.0  # inputs never seen: their weights cannot matter on the data
    warm = start if keep is not None else None
    # From another update's answer on the same mask (SparseGPT's), conjugate gradients alone
    # reach the least-squares answer sooner; ADMM's iterations are for a plain mask.
    iterations = options.admm_iterations
    if iterations is None:
        iterations = 0 if warm is not None else ITERATIONS
    # Toward the dense model's outputs (model_target): ‖ŴX_p − WX_d‖² differs from the classic
    # objective by the linear term w₀·D (D = 2/n·(X_d − X_p)ᵀX_p), here shrunk and scaled
    # (see :func:`prepare`).
    extra = W0 @ stats[SHIFT] if SHIFT in stats else None
    Z, support = admm(W0, H, keep, options, iterations, warm, extra)
    final = conjugate_gradient(Z, W0, H, support, options.cg_iterations, extra)
    return Result(final, support, float(stats[DAMP_USED]))


def prune(W: torch.Tensor, stats: Stats, options: Options) -> Result:
    """The ``admm`` method: the mask chosen inside the ADMM iterations, then the refit."""
    return refit(W, stats, None, options)
