"""Known answers and naive references for the mask selectors in llmprune.core.patterns."""

import itertools

import pytest
import torch

from llmprune.core.patterns import Pattern, keep_nm, keep_unstructured, prune_count
from llmprune.errors import LlmpruneError


def naive_lowest(values: list[float], count: int) -> set[int]:
    """Indices of the `count` lowest values; among ties the lower index goes first."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    return set(order[:count])


def naive_keep_rows(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        for j in naive_lowest(row, prune_count(len(row), sparsity)):
            keep[r, j] = False
    return keep


def naive_keep_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = scores.flatten().tolist()
    keep = torch.ones(len(flat), dtype=torch.bool)
    for j in naive_lowest(flat, prune_count(len(flat), sparsity)):
        keep[j] = False
    return keep.reshape(scores.shape)


def naive_keep_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        for g in range(0, len(row), m):
            for j in naive_lowest(row[g : g + m], m - n):
                keep[r, g + j] = False
    return keep


def tied_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Scores drawn from a handful of values, so ties are everywhere."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (rows, cols), generator=gen).float()


def test_pattern_parse_and_names():
    assert Pattern.parse("2:4") == Pattern("nm", 2, 4)
    assert Pattern.parse(" Unstructured ") == Pattern("unstructured")
    assert Pattern.parse("2:4").implied_sparsity == 0.5
    assert Pattern.parse("1:4").implied_sparsity == 0.75
    assert str(Pattern.parse("4:8")) == "4:8"
    for bad in ("2-4", "4:2", "0:4", "4:4", "half", ""):
        with pytest.raises(LlmpruneError):
            Pattern.parse(bad)


def test_prune_count_is_robust_to_float_noise():
    assert prune_count(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996
    assert prune_count(10, 0.5) == 5
    assert prune_count(7, 0.5) == 3
    assert prune_count(4, 0.0) == 0


def test_known_answer_row_and_layer():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 8.0, 7.0, 9.0]])
    assert keep_unstructured(scores, 0.5, "row").tolist() == [[True, False, True, False], [False, True, False, True]]
    # Per layer the four lowest of all eight go: 0.5, 1, 2, 3.
    assert keep_unstructured(scores, 0.5, "layer").tolist() == [[True, False, False, False], [False, True, True, True]]


def test_known_answer_nm():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0, 9.0, 8.0, 0.0, 7.0]])
    # 2:4 keeps the two largest of every four.
    assert keep_nm(scores, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    # 1:4 keeps one.
    assert keep_nm(scores, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]


def test_ties_prune_lower_index_first():
    scores = torch.ones(1, 8)
    assert keep_unstructured(scores, 0.5, "row").tolist() == [[False] * 4 + [True] * 4]
    assert keep_nm(scores, 2, 4).tolist() == [[False, False, True, True] * 2]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.99])
def test_unstructured_matches_naive(seed, sparsity):
    for scores in (tied_scores(5, 12, seed), torch.randn(5, 12, generator=torch.Generator().manual_seed(seed))):
        assert torch.equal(keep_unstructured(scores, sparsity, "row"), naive_keep_rows(scores, sparsity))
        assert torch.equal(keep_unstructured(scores, sparsity, "layer"), naive_keep_layer(scores, sparsity))


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (2, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_nm_matches_naive(n, m, seed):
    for scores in (tied_scores(6, 4 * m, seed), torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(seed))):
        keep = keep_nm(scores, n, m)
        assert torch.equal(keep, naive_keep_nm(scores, n, m))
        assert (keep.reshape(6, 4, m).sum(-1) == n).all()


def test_nm_rejects_width_not_divisible():
    with pytest.raises(LlmpruneError, match="not divisible"):
        keep_nm(torch.randn(2, 10), 2, 4)


@pytest.mark.parametrize("rows_cols", list(itertools.product([1, 3, 16], [4, 8, 24])))
def test_exact_counts(rows_cols):
    rows, cols = rows_cols
    scores = torch.randn(rows, cols)
    assert (~keep_unstructured(scores, 0.5, "row")).sum().item() == rows * prune_count(cols, 0.5)
    assert (~keep_unstructured(scores, 0.5, "layer")).sum().item() == prune_count(rows * cols, 0.5)
