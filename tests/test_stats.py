"""Streaming statistics against direct computation."""

import pytest
import torch

from llmprune.core.stats import ColumnNorms, Hessian, InputSample, relative_error


@pytest.mark.parametrize("dim", [1, 7, 256, 300, 600])
def test_hessian_equals_two_over_n_xtx_whatever_the_batching(dim):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 50, dim, generator=gen)
    acc = Hessian(dim)
    acc.add(x[:1])
    acc.add(x[1:])
    rows = x.reshape(-1, dim).double()
    expected = 2 * rows.T @ rows / rows.shape[0]
    assert acc.n == 150
    assert torch.allclose(acc.value().double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.value(), acc.value().T)


def test_column_norms_and_known_answer():
    x = torch.tensor([[[3.0, 0.0], [4.0, 1.0]]])
    acc = ColumnNorms(2)
    acc.add(x)
    assert acc.value().tolist() == [5.0, 1.0]
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, 10, 6, generator=gen)
    acc = ColumnNorms(6)
    for part in y:
        acc.add(part)
    assert torch.allclose(acc.value(), y.reshape(-1, 6).norm(dim=0), atol=1e-5)


def test_input_sample_is_bounded_and_strided():
    sample = InputSample(size=4)
    sample.add(torch.arange(20.0).reshape(10, 2))
    assert sample.value().tolist() == [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0], [12.0, 13.0]]


def test_input_sample_copies_its_rows():
    """A view of the rows would keep the whole batch's activations alive (and follow its changes)."""
    x = torch.arange(20.0).reshape(10, 2)
    sample = InputSample(size=4)
    sample.add(x)
    assert all(part.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for part in sample.parts)
    assert all(part.untyped_storage().nbytes() == part.numel() * 4 for part in sample.parts)
    x.zero_()
    assert sample.value()[1].tolist() == [4.0, 5.0]


def test_relative_error_known_answer():
    W = torch.tensor([[1.0, 1.0]])
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert relative_error(W, W, X) == 0.0
    # Removing the second weight loses one of two unit outputs: ‖ΔWX‖² / ‖WX‖² = 1 / 2.
    assert relative_error(W, torch.tensor([[1.0, 0.0]]), X) == pytest.approx(0.5)
