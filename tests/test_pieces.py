"""The composable pieces of issue "beat the references": the ADMM least-squares update, DSnoT's
mask refinement, OWL's layer sparsity, and how they compose. Known answers on hand-computable
tensors, slow naive references for the vectorised routines."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmprune.core.allocation import outlier_ratio, owl_sparsities
from llmprune.core.patterns import Pattern, keep_nm, keep_unstructured
from llmprune.core.stats import MEAN_VAR
from llmprune.engine.config import PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.methods import COLUMN_NORMS, HESSIAN, Options, admm, dsnot, get_method, pieces
from llmprune.methods.sparsegpt import obs_update


def problem(rows=12, cols=16, tokens=400, seed=0):
    """Dense weights and correlated inputs: (W, X, H = 2XᵀX/n)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix + 0.5  # nonzero means, for DSnoT
    W = torch.randn(rows, cols, generator=g)
    return W, X, 2 * X.T @ X / tokens


def objective(W0, W, H):
    D = (W - W0).double()
    return float(torch.einsum("ri,ij,rj->", D, H.double(), D))


def damped(H, options):
    shrunk = H * (1 - options.shrink)
    shrunk.diagonal().copy_(H.diagonal())
    shrunk.diagonal().add_(options.damp * float(shrunk.diagonal().mean()))
    return shrunk


def direct_least_squares(W0, H, keep):
    """Row by row: w_S = H_SS⁻¹ (H w₀)_S, zero elsewhere (the slow exact answer)."""
    out = torch.zeros_like(W0, dtype=torch.float64)
    H64, W64 = H.double(), W0.double()
    for r in range(W0.shape[0]):
        S = keep[r].nonzero().flatten()
        out[r, S] = torch.linalg.solve(H64[S][:, S], (W64[r] @ H64)[S])
    return out


def test_admm_refit_worked_example():
    options = Options(shrink=0.0, damp=1e-9, admm_iterations=20, cg_iterations=5)
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    result = admm.refit(torch.tensor([[1.0, 1.0]]), {HESSIAN: H}, torch.tensor([[False, True]]), options)
    assert result.weight[0, 0] == 0.0
    assert result.weight[0, 1].item() == pytest.approx(1.5, abs=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_refit_equals_the_direct_least_squares_solve_on_the_support(pattern):
    W, _, H = problem()
    options = Options(pattern=Pattern.parse(pattern), shrink=0.1, damp=0.01, admm_iterations=30, cg_iterations=40)
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(W.shape, generator=g)
    keep = keep_nm(scores, 2, 4) if pattern == "2:4" else keep_unstructured(scores, 0.5)
    result = admm.refit(W, {HESSIAN: H}, keep, options)
    expected = direct_least_squares(W, damped(H, options), keep)
    assert torch.equal(result.keep, keep) and bool((result.weight[~keep] == 0).all())
    assert torch.allclose(result.weight.double(), expected, atol=1e-4, rtol=1e-4)
    # ...and no worse than the one-pass OBS update on the same mask, under the same matrix.
    obs = obs_update(W, {HESSIAN: H}, keep, options).weight
    assert objective(W, result.weight, damped(H, options)) <= objective(W, obs, damped(H, options)) + 1e-6


def test_admm_without_iterations_is_conjugate_gradients_alone_and_still_exact():
    W, _, H = problem(seed=2)
    options = Options(shrink=0.0, damp=0.01, admm_iterations=0, cg_iterations=60)
    keep = keep_unstructured(torch.rand(W.shape, generator=torch.Generator().manual_seed(3)), 0.6)
    result = admm.refit(W, {HESSIAN: H}, keep, options)
    assert torch.allclose(result.weight.double(), direct_least_squares(W, damped(H, options), keep), atol=1e-4)


@pytest.mark.parametrize(("pattern", "sparsity", "group"), [
    ("unstructured", 0.6, "layer"), ("unstructured", 0.5, "row"), ("2:4", 0.5, "row"), ("4:8", 0.5, "row")])
def test_the_admm_method_chooses_its_mask_to_the_exact_count(pattern, sparsity, group):
    W, _, H = problem(rows=16, cols=32)
    options = Options(pattern=Pattern.parse(pattern), sparsity=sparsity, group=group)
    result = admm.prune(W, {HESSIAN: H}, options)
    zeros = (result.weight == 0) & ~result.keep
    assert bool(zeros.eq(~result.keep).all())  # every pruned weight is an exact zero
    if pattern == "unstructured":
        count = int((~result.keep).sum()) if group == "layer" else (~result.keep).sum(1)
        assert torch.equal(torch.as_tensor(count), torch.as_tensor(int(W.numel() * sparsity)) if group == "layer"
                           else torch.full((W.shape[0],), int(W.shape[1] * sparsity)))
    else:
        n, m = map(int, pattern.split(":"))
        assert bool((result.keep.reshape(W.shape[0], -1, m).sum(-1) == n).all())
    # A better layer-wise fit than masking by the same score and refitting afterwards is not
    # promised; a better fit than no update at all is.
    assert objective(W, result.weight, H) < objective(W, W * result.keep, H)


def sgn(x: float) -> int:
    return (x > 0) - (x < 0)


def naive_dsnot_rows(W, mean, var, norms, keep, cycles):
    """Row by row, swap by swap, as the module docstring says."""
    keep = keep.clone()
    d = (W * mean).double()
    cols = range(W.shape[1])
    for r in range(W.shape[0]):
        e = float((d[r] * ~keep[r]).sum())
        sign = sgn(e)
        grow = sorted([j for j in cols if not keep[r, j] and sign != 0 and sgn(float(d[r, j])) == sign],
                      key=lambda j: (-(float(d[r, j]) / float(var[j])) * sign, j))
        prune = sorted([k for k in cols if keep[r, k] and sgn(float(d[r, k])) == -sign],
                       key=lambda k: (float(abs(W[r, k]) * norms[k]), k))
        for g, k in list(zip(grow, prune, strict=False))[:cycles]:
            after = e + float(d[r, k]) - float(d[r, g])
            if not (abs(after) < abs(e) and sgn(after) != -sign):
                break
            keep[r, g], keep[r, k], e = True, False, after
    return keep


def dsnot_stats(X):
    return {MEAN_VAR: torch.stack([X.mean(0), X.var(0)]), COLUMN_NORMS: X.norm(dim=0)}


def test_dsnot_worked_example():
    W = torch.tensor([[4.0, 3.0, 1.0, 2.0]])
    stats = {MEAN_VAR: torch.tensor([[-0.25, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), COLUMN_NORMS: torch.ones(4)}
    keep = torch.tensor([[True, True, False, False]])
    refined = dsnot.refine(W, stats, keep, Options())
    assert refined.tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dsnot_matches_its_naive_reference_keeps_counts_and_never_raises_its_objective(seed):
    W, X, _ = problem(rows=24, cols=32, seed=seed)
    stats = dsnot_stats(X)
    wanda = W.abs() * stats[COLUMN_NORMS]
    keep = keep_unstructured(wanda, 0.5)
    options = Options(dsnot_cycles=10)
    refined = dsnot.refine(W, stats, keep, options)
    expected = naive_dsnot_rows(W, stats[MEAN_VAR][0], stats[MEAN_VAR][1], stats[COLUMN_NORMS], keep, 10)
    assert torch.equal(refined, expected)
    assert torch.equal(refined.sum(1), keep.sum(1))
    before = dsnot.expected_shift(W, keep, stats[MEAN_VAR][0]).abs()
    after = dsnot.expected_shift(W, refined, stats[MEAN_VAR][0]).abs()
    assert bool((after <= before + 1e-9).all()) and bool((after < before).any())


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_dsnot_keeps_every_nm_group_and_never_raises_its_objective(n, m):
    W, X, _ = problem(rows=24, cols=32, seed=5)
    stats = dsnot_stats(X)
    keep = keep_nm(W.abs() * stats[COLUMN_NORMS], n, m)
    refined = dsnot.refine(W, stats, keep, Options(pattern=Pattern("nm", n, m)))
    assert bool((refined.reshape(24, -1, m).sum(-1) == n).all())
    before = dsnot.expected_shift(W, keep, stats[MEAN_VAR][0]).abs()
    after = dsnot.expected_shift(W, refined, stats[MEAN_VAR][0]).abs()
    assert bool((after <= before + 1e-9).all()) and not torch.equal(refined, keep)


def test_owl_worked_example_and_its_properties():
    assert owl_sparsities([0.01, 0.02, 0.03], [1, 1, 1], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    assert owl_sparsities([0.01, 0.05, 0.03], [5, 1, 2], 0.7, 0.0) == [0.7, 0.7, 0.7]  # λ = 0: uniform
    ratios, sizes = [0.03, 0.01, 0.04, 0.02], [100, 300, 200, 100]
    sparsity = owl_sparsities(ratios, sizes, 0.6, 0.08)
    weighted = sum(s * n for s, n in zip(sparsity, sizes, strict=True)) / sum(sizes)
    assert weighted == pytest.approx(0.6, abs=1e-12)  # the mean over all pruned weights is the target
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [sparsity[i] for i in order] == sorted(sparsity, reverse=True)  # more outliers, less pruned
    assert max(sparsity) - min(sparsity) == pytest.approx(0.16)
    with pytest.raises(LlmpruneError, match="smaller owl_lambda"):
        owl_sparsities(ratios, sizes, 0.95, 0.08)


def test_outlier_ratio_counts_scores_above_m_times_the_mean_over_all_linears():
    # mean of [1, 1, 1, 1, 1, 1, 1, 13] = 2.5; above 5 × 2.5 = 12.5: one of eight.
    assert outlier_ratio([torch.ones(2, 3), torch.tensor([[1.0, 13.0]])], 5.0) == 1 / 8


def test_the_pieces_alone_are_the_method_bit_for_bit_and_compose_otherwise():
    W, X, H = problem()
    stats = {HESSIAN: H, **dsnot_stats(X)}
    for name in ("wanda", "sparsegpt", "magnitude"):
        method = get_method(name)
        options = PruneConfig(method=name).options()
        assert pieces.alone(method, options)
        prepared = pieces.prepare(method, dict(stats), options)
        assert torch.equal(pieces.prune(method, W, prepared, options).weight,
                           method.prune(W, method.prepare(dict(stats), options), options).weight)
    options = PruneConfig(method="wanda", refine="dsnot", update="admm").options()
    wanda = get_method("wanda")
    assert not pieces.alone(wanda, options)
    assert pieces.needs(wanda, options) == {COLUMN_NORMS, MEAN_VAR, HESSIAN}
    result = pieces.prune(wanda, W, pieces.prepare(wanda, dict(stats), options), options)
    mask = dsnot.refine(W, stats, keep_unstructured(W.abs() * stats[COLUMN_NORMS], 0.5), options)
    assert torch.equal(result.keep, mask)
    expected = direct_least_squares(W, damped(H, options), mask)
    assert objective(W, result.weight, damped(H, options)) == pytest.approx(
        objective(W, expected.float(), damped(H, options)), rel=1e-3)


@pytest.mark.parametrize(("change", "words"), [
    ({"update": "bogus"}, "update must be"), ({"refine": "x"}, "refine must be"),
    ({"allocation": "owl", "pattern": "2:4"}, "fixes at 2 of every 4"), ({"owl_lambda": 1.5}, "owl_lambda"),
    ({"admm_iterations": -1}, "admm_iterations"), ({"method": "admm", "update": "none"}, "always updates"),
])
def test_bad_piece_settings_are_refused_before_any_work(change, words):
    with pytest.raises(LlmpruneError, match=words):
        PruneConfig(**change)


def test_a_later_schedule_step_keeps_every_earlier_zero_pruned():
    # SparseGPT's updates move earlier zeros off zero before their block is chosen; a schedule's
    # later step pins them, so the masks nest and the count is still exact.
    from llmprune.methods import sparsegpt

    W, _, H = problem(rows=16, cols=64)
    options = Options(group="layer", shrink=0.0, blocksize=16)  # many blocks: many lazy updates
    stats = sparsegpt.prepare({HESSIAN: H}, options)
    first = sparsegpt.prune(W, stats, replace(options, sparsity=0.3))
    unpinned = sparsegpt.prune(first.weight, stats, replace(options, sparsity=0.6))
    pinned = sparsegpt.prune(first.weight, stats, replace(options, sparsity=0.6, keep_zeros=True))
    earlier = ~first.keep
    assert bool((~pinned.keep)[earlier].all()) and bool((pinned.weight[earlier] == 0).all())
    assert int((~pinned.keep).sum()) == int(16 * 64 * 0.6)
    assert not bool((~unpinned.keep)[earlier].all())  # what the pin is for


def test_schedule_settings_are_checked():
    assert PruneConfig(schedule=[0.3, 0.5]).target_sparsity == 0.5
    for bad, words in (((0.5, 0.3), "rise"), ((0.3, 1.2), "in \\(0, 1\\)"), ((0.3, 0.6), "ends at 0.6")):
        with pytest.raises(LlmpruneError, match=words):
            PruneConfig(schedule=bad, sparsity=0.5 if words.startswith("ends") else None)
    with pytest.raises(LlmpruneError, match="one step only"):
        PruneConfig(pattern="2:4", schedule=(0.25, 0.5))


def test_the_default_recipe_follows_a_schedules_end():
    """Without --sparsity the schedule's last step is the target: the recipe is 70%'s."""
    scheduled, direct = PruneConfig(schedule=(0.35, 0.7)), PruneConfig(sparsity=0.7)
    assert scheduled.target_sparsity == 0.7
    assert (scheduled.shrink, scheduled.allocation) == (direct.shrink, direct.allocation) == (0.1, "owl")
    assert (PruneConfig(schedule=(0.25, 0.5)).method, PruneConfig(schedule=(0.25, 0.5)).shrink) == ("ria", 0.4)


def test_the_admm_method_keeps_earlier_zeros_pruned_in_a_later_step():
    W, _, H = problem(rows=16, cols=32)
    options = Options(group="layer")
    first = admm.prune(W, {HESSIAN: H}, replace(options, sparsity=0.3))
    later = admm.prune(first.weight, {HESSIAN: H}, replace(options, sparsity=0.6, keep_zeros=True))
    assert bool((~later.keep)[~first.keep].all()) and int((~later.keep).sum()) == int(16 * 32 * 0.6)
