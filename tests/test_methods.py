"""Known-answer tests for magnitude, Wanda and SparseGPT, and the vectorised OBS solver
against a slow column-by-column reference of SparseGPT's Algorithm 1."""

import itertools

import pytest
import torch

from llmprune.core.factor import inverse_hessian_factor
from llmprune.core.patterns import Pattern, keep_nm, prune_count
from llmprune.errors import LlmpruneError
from llmprune.methods import COLUMN_NORMS, HESSIAN, Options, get_method
from llmprune.methods.sparsegpt import keep_group, obs_update, shrink_to_diagonal


def opts(pattern="unstructured", sparsity=0.5, group="layer", update="none", blocksize=128, damp=0.01,
         nm_select="joint", shrink=0.0):
    """Options for the known answers, which are those of the paper's algorithm: no shrinkage
    unless a test asks for it."""
    return Options(Pattern.parse(pattern), sparsity, group, update, blocksize, damp, nm_select, shrink)


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def naive_group_keep(w, U, n, select):
    """Keep mask of one N:M group. "joint": every pruned set S tried, the column recursion run
    for each and the least total squared error kept (first in combination order on ties)."""
    rows, m = w.shape
    if select == "score":
        return keep_nm((w**2 / U.diagonal() ** 2).float(), n, m)
    keep = torch.ones(rows, m, dtype=torch.bool)
    for r in range(rows):
        best = None
        for pruned in itertools.combinations(range(m), m - n):
            row, loss = w[r].clone(), 0.0
            for j in range(m):
                if j in pruned:
                    err = row[j] / U[j, j]
                    row[j:] -= err * U[j, j:]
                    loss += err.item() ** 2
            if best is None or loss < best[0]:
                best = (loss, pruned)
        keep[r, list(best[1])] = False
    return keep


def naive_sparsegpt(W, H, sparsity, nm=None, blocksize=128, damp=0.01, keep=None, select="joint", shrink=0.0):
    """Algorithm 1 of the SparseGPT paper, one column at a time (slow, obviously correct), on
    the Hessian with its off-diagonal entries scaled by 1 − shrink."""
    W = W.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    for i in range(cols):
        for j in range(cols):
            if i != j:
                H[i, j] *= 1 - shrink
    dead = H.diagonal() == 0
    live_mean = H.diagonal()[~dead].mean()  # λ: a fraction of the live inputs' mean energy
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    H = H + torch.eye(cols, dtype=H.dtype) * damp * live_mean
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    chosen = keep is None
    keep = torch.ones(rows, cols, dtype=torch.bool) if keep is None else keep.clone()
    for s0 in range(0, cols, blocksize):
        s1 = min(s0 + blocksize, cols)
        if chosen and nm is None:
            scores = (W[:, s0:s1] ** 2 / U.diagonal()[s0:s1] ** 2).flatten().tolist()
            count = prune_count(rows * s1, sparsity) - prune_count(rows * s0, sparsity)
            order = sorted(range(len(scores)), key=lambda j: (scores[j], j))[:count]
            block_keep = torch.ones(len(scores), dtype=torch.bool)
            block_keep[order] = False
            keep[:, s0:s1] = block_keep.reshape(rows, s1 - s0)
        for j in range(s0, s1):
            if chosen and nm is not None and (j - s0) % nm[1] == 0:
                window = slice(j, j + nm[1])
                keep[:, window] = naive_group_keep(W[:, window], U[window, window], nm[0], select)
            q = W[:, j] * keep[:, j]
            err = (W[:, j] - q) / U[j, j]
            W[:, j:] -= err[:, None] * U[j, j:][None, :]  # eager update of every later column
            W[:, j] = q
    return W.float(), keep


def test_wanda_known_answer():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    result = get_method("wanda").prune(W, {COLUMN_NORMS: torch.tensor([100.0, 10.0, 1.0, 0.1])}, opts(group="row"))
    assert result.weight.tolist() == [[1.0, 2.0, 0.0, 0.0]]
    assert result.keep.tolist() == [[True, True, False, False]]


def test_wanda_differs_from_magnitude_per_row():
    W = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([0.1, 1.0, 10.0, 100.0])
    wanda = get_method("wanda").prune(W, {COLUMN_NORMS: norms}, opts(group="row")).weight
    magnitude = get_method("magnitude").prune(W, {}, opts(group="row")).weight
    assert wanda.tolist() == [[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 3.0, 4.0]]
    assert magnitude.tolist() == [[4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0]]


def test_magnitude_per_layer_and_nm():
    W = torch.tensor([[0.1, -5.0, 0.2, 3.0], [4.0, 0.3, -2.0, 0.05]])
    layer = get_method("magnitude").prune(W, {}, opts(group="layer")).weight
    assert layer.tolist() == [[0.0, -5.0, 0.0, 3.0], [4.0, 0.0, -2.0, 0.0]]
    nm = get_method("magnitude").prune(W, {}, opts(pattern="1:2")).weight
    assert nm.tolist() == [[0.0, -5.0, 0.0, 3.0], [4.0, 0.0, -2.0, 0.0]]


def test_sparsegpt_identity_hessian_equals_masking():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32, generator=gen)
    result = get_method("sparsegpt").prune(W, {HESSIAN: torch.eye(32)}, opts())
    # With H = I every OBS score is w²·(1+λ): the mask is plain magnitude, and no update happens.
    expected = get_method("magnitude").prune(W, {}, opts()).weight
    assert torch.allclose(result.weight, expected, atol=1e-6)


def test_obs_first_column_pruned_is_least_squares_refit():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(4000, 6, generator=gen) @ torch.randn(6, 6, generator=gen)  # correlated inputs
    W = torch.randn(3, 6, generator=gen)
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[:, 0] = False
    tiny_damp = 1e-9
    result = obs_update(W, {HESSIAN: hessian_of(X)}, keep, opts(damp=tiny_damp))
    # Least squares: the kept columns best reproduce W X using X without its first column.
    target = X @ W.T
    refit = torch.linalg.lstsq(X[:, 1:].double(), target.double()).solution.T.float()
    assert result.weight[:, 0].abs().max() == 0
    assert torch.allclose(result.weight[:, 1:], refit, atol=1e-3)


def test_obs_reconstructs_a_redundant_column_exactly():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2000, 3, generator=gen)
    # Column 0 = 2·x1 + x2. OBS only moves weight onto columns to the right of a pruned one
    # (SparseGPT processes columns left to right), so the redundant column comes first.
    X = torch.cat([base[:, :1] * 2 + base[:, 1:2], base], 1)
    W = torch.tensor([[3.0, 0.5, -1.0, 0.25]])
    keep = torch.tensor([[False, True, True, True]])
    H = hessian_of(X)
    H.diagonal().add_(1e-6)  # X has rank 3; keep H invertible without changing the answer
    result = obs_update(W, {HESSIAN: H}, keep, opts(damp=1e-9))
    assert result.weight[0, 0] == 0
    assert torch.allclose(X @ result.weight.T, X @ W.T, atol=1e-2)
    assert torch.allclose(result.weight[0, 1:], torch.tensor([6.5, 2.0, 0.25]), atol=1e-2)


@pytest.mark.parametrize("pattern,select,shrink", [
    ("unstructured", "joint", 0.0), ("2:4", "joint", 0.0), ("2:4", "score", 0.0), ("4:8", "joint", 0.0),
    ("4:8", "score", 0.0), ("1:4", "joint", 0.0), ("unstructured", "joint", 0.1), ("2:4", "joint", 0.3),
    ("4:8", "score", 0.1)])
@pytest.mark.parametrize("blocksize", [128, 16, 24])
def test_sparsegpt_matches_naive_reference(pattern, select, shrink, blocksize):
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    X[:, 5] = 0  # a dead input
    W = torch.randn(16, 64, generator=gen)
    H = hessian_of(X)
    options = opts(pattern=pattern, blocksize=blocksize, nm_select=select, shrink=shrink)
    result = get_method("sparsegpt").prune(W, {HESSIAN: H}, options)
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    W_ref, keep_ref = naive_sparsegpt(W, H, 0.5, nm, blocksize, select=select, shrink=shrink)
    assert torch.equal(result.keep, keep_ref)
    assert torch.allclose(result.weight, W_ref, atol=2e-4)
    assert (result.weight[~result.keep] == 0).all()
    if nm is None:
        assert (result.weight == 0).sum().item() >= prune_count(W.numel(), 0.5)
    else:
        assert ((result.weight != 0).reshape(16, -1, nm[1]).sum(-1) <= nm[0]).all()


def test_shrink_to_diagonal_known_answer():
    H = torch.tensor([[1.0, 0.8], [0.8, 2.0]])
    assert torch.equal(shrink_to_diagonal(H, 0.0), H)
    assert torch.allclose(shrink_to_diagonal(H, 0.5), torch.tensor([[1.0, 0.4], [0.4, 2.0]]))
    assert torch.equal(shrink_to_diagonal(H, 1.0), torch.diag(H.diagonal()))
    assert torch.equal(H, torch.tensor([[1.0, 0.8], [0.8, 2.0]]))  # the input is left alone


def test_shrink_weakens_the_update_toward_correlated_inputs():
    """Inputs x0, x1 with correlation 0.8 (H = 2·[[1, .8], [.8, 1]]), W = [[1, 1]], column 0
    pruned. The OBS update adds w0·H01/H11 = 0.8 to w1 (the least-squares refit); with shrink
    0.5 the correlation counts as 0.4 and w1 gets 0.4 (damping ~0)."""
    H = 2 * torch.tensor([[1.0, 0.8], [0.8, 1.0]])
    W = torch.tensor([[1.0, 1.0]])
    keep = torch.tensor([[False, True]])
    plain = obs_update(W, {HESSIAN: H}, keep, opts(damp=1e-9))
    shrunk = obs_update(W, {HESSIAN: H}, keep, opts(damp=1e-9, shrink=0.5))
    assert torch.allclose(plain.weight, torch.tensor([[0.0, 1.8]]), atol=1e-5)
    assert torch.allclose(shrunk.weight, torch.tensor([[0.0, 1.4]]), atol=1e-5)


def test_full_shrink_is_wanda_without_update():
    """shrink 1: H diagonal, no update, and the OBS score w²·H_jj ranks as Wanda's |w|·‖x_j‖."""
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(400, 48, generator=gen) @ torch.randn(48, 48, generator=gen)
    W = torch.randn(12, 48, generator=gen)
    for pattern in ("unstructured", "2:4"):
        sgpt = get_method("sparsegpt").prune(W, {HESSIAN: hessian_of(X)},
                                             opts(pattern=pattern, group="row", damp=1e-9, shrink=1.0))
        wanda = get_method("wanda").prune(W, {COLUMN_NORMS: X.norm(dim=0)}, opts(pattern=pattern, group="row"))
        assert torch.equal(sgpt.keep, wanda.keep)
        assert torch.allclose(sgpt.weight, wanda.weight)


def test_joint_nm_choice_sees_what_per_weight_scores_miss():
    """2:4 with U = I except U_12 = 0.95: pruning column 1 passes err·0.95 on to column 2, which
    then almost vanishes. Scores w²/U_jj² pick {0, 2} (1 + 1.1025 = 2.10); the group's true error
    is least for {1, 2}: 1.1² + (1.05 − 1.1·0.95)² = 1.210025."""
    w = torch.tensor([[1.0, 1.1, 1.05, 1.2]])
    U = torch.eye(4)
    U[1, 2] = 0.95
    assert keep_group(w, U, 2, "score").tolist() == [[False, True, False, True]]
    assert keep_group(w, U, 2, "joint").tolist() == [[True, False, False, True]]


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_joint_nm_choice_matches_brute_force(nm):
    gen = torch.Generator().manual_seed(7)
    m = nm[1]
    A = torch.randn(m, m, generator=gen, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(A @ A.T + 0.1 * torch.eye(m, dtype=torch.float64)), upper=True)
    w = torch.randn(50, m, generator=gen, dtype=torch.float64)
    assert torch.equal(keep_group(w, U, nm[0], "joint"), naive_group_keep(w, U, nm[0], "joint"))


def test_obs_update_with_fixed_mask_matches_naive():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(300, 40, generator=gen) @ torch.randn(40, 40, generator=gen)
    W = torch.randn(8, 40, generator=gen)
    keep = torch.rand(8, 40, generator=gen) > 0.6
    H = hessian_of(X)
    result = obs_update(W, {HESSIAN: H}, keep, opts(blocksize=16))
    W_ref, _ = naive_sparsegpt(W, H, 0.0, None, 16, keep=keep)
    assert torch.allclose(result.weight, W_ref, atol=2e-4)
    assert torch.equal(result.keep, keep)


def test_obs_update_beats_plain_masking_on_correlated_inputs():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(1000, 32, generator=gen) @ torch.randn(32, 32, generator=gen)
    W = torch.randn(16, 32, generator=gen)
    H = hessian_of(X)
    masked = get_method("magnitude").prune(W, {}, opts())
    updated = get_method("magnitude").prune(W, {HESSIAN: H}, opts(update="obs"))
    assert torch.equal(masked.keep, updated.keep)

    def error(w):
        return ((X @ (W - w).T) ** 2).sum()

    assert error(updated.weight) < 0.9 * error(masked.weight)


def test_inverse_hessian_factor_is_upper_cholesky_of_inverse():
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(200, 10, generator=gen)
    H = hessian_of(X)
    U, damp = inverse_hessian_factor(H, 0.01)
    damped = H + torch.eye(10) * 0.01 * H.diagonal().mean()
    assert damp == 0.01
    assert torch.allclose(U, torch.triu(U))
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), atol=1e-5)
    assert (U.diagonal() > 0).all()


def test_singular_hessian_retries_then_fails_clearly():
    # Indefinite: damping of 0.01..100 x mean(diag) cannot fix -I... mean(diag) is negative.
    with pytest.raises(LlmpruneError, match="singular"):
        inverse_hessian_factor(-torch.eye(4), 0.01)
    # Rank-deficient but fixable by damping: succeeds at the first try.
    U, damp = inverse_hessian_factor(torch.ones(4, 4), 0.01)
    assert damp == 0.01 and torch.isfinite(U).all()


def test_inverse_hessian_factor_leaves_h_alone_and_takes_the_live_mean():
    gen = torch.Generator().manual_seed(7)
    H = hessian_of(torch.randn(300, 12, generator=gen))
    before = H.clone()
    U, _ = inverse_hessian_factor(H, 0.01, mean_diag=2.5)
    assert torch.equal(H, before)
    assert torch.allclose(U.T @ U, torch.linalg.inv(H + torch.eye(12) * 0.01 * 2.5), atol=1e-5)
    # the slow reference: Cholesky of the explicit inverse, upper
    reference = torch.linalg.cholesky(torch.linalg.inv(H.double() + torch.eye(12, dtype=torch.float64) * 0.025),
                                      upper=True)
    assert torch.allclose(U.double(), reference, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 11, 64])
def test_in_place_reverse_equals_flip(n):
    from llmprune.core.factor import reverse_in_place

    x = torch.arange(n, dtype=torch.float32)
    for chunk in (1, 2, 3, 100):
        y = x.clone()
        reverse_in_place(y, chunk)
        assert torch.equal(y, x.flip(0))


def test_damping_is_a_fraction_of_the_live_inputs_energy():
    """70% dead inputs (a ReLU model's): λ follows the live inputs' mean diag H, not one
    diluted by the dead inputs' placeholder."""
    from llmprune.methods.base import FACTOR
    from llmprune.methods.sparsegpt import prepare

    gen = torch.Generator().manual_seed(8)
    X = torch.randn(400, 10, generator=gen) * 10
    X[:, 3:] = 0  # 7 of 10 inputs never fire
    H = hessian_of(X)
    options = opts(shrink=0.0)
    U = prepare({"hessian": H}, options)[FACTOR]
    live = H.diagonal()[:3].mean()
    damped = H.clone()
    damped.diagonal()[3:] = 1.0
    damped += torch.eye(10) * 0.01 * live
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)


def naive_ria(W: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """RIA's score weight by weight, from the paper's formula."""
    rows, cols = W.shape
    out = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            row = sum(abs(float(W[i, k])) for k in range(cols))
            col = sum(abs(float(W[k, j])) for k in range(rows))
            w = abs(float(W[i, j]))
            out[i, j] = ((w / row if row else 0.0) + (w / col if col else 0.0)) * float(norms[j]) ** 0.5
    return out


def test_ria_known_answer_keeps_an_input_wanda_drops():
    W = torch.tensor([[4.0, 1.0], [4.0, 3.0]])
    ria = get_method("ria").prune(W, {COLUMN_NORMS: torch.ones(2)}, opts(group="row"))
    wanda = get_method("wanda").prune(W, {COLUMN_NORMS: torch.ones(2)}, opts(group="row"))
    assert ria.weight.tolist() == [[4.0, 0.0], [0.0, 3.0]]
    assert wanda.weight.tolist() == [[4.0, 0.0], [4.0, 0.0]]
    # The activation factor √‖X‖ = [2, 1] turns row 1 back to column 0.
    assert get_method("ria").prune(W, {COLUMN_NORMS: torch.tensor([4.0, 1.0])}, opts(group="row")).weight.tolist() \
        == [[4.0, 0.0], [4.0, 0.0]]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ria_scores_match_the_formula_and_masks_keep_their_pattern(pattern):
    from llmprune.methods.ria import scores

    torch.manual_seed(0)
    W, norms = torch.randn(6, 8), torch.rand(8) * 10
    W[2] = 0.0  # an all-zero row scores 0, not NaN
    assert torch.allclose(scores(W, norms), naive_ria(W, norms), rtol=1e-5, atol=1e-7)
    result = get_method("ria").prune(W, {COLUMN_NORMS: norms}, opts(pattern=pattern, group="row"))
    assert int((~result.keep).sum()) == 24 and torch.equal(result.weight, W * result.keep)
    if pattern == "2:4":
        assert (result.keep.reshape(6, 2, 4).sum(-1) == 2).all()
    else:
        assert (result.keep.sum(1) == 4).all()
