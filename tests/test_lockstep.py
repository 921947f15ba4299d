"""Lockstep execution of several batches: same results as one batch, errors surface, no hang."""

import pytest
import torch
from torch import nn

from llmprune.capture import LayerCall
from llmprune.lockstep import Lockstep

CPU = torch.device("cpu")


class Block(nn.Module):
    def __init__(self, fail_on_batch_size: int | None = None) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.fail_on_batch_size = fail_on_batch_size

    def forward(self, x):
        if x.shape[0] == self.fail_on_batch_size:
            raise ValueError("boom")
        return self.second(torch.relu(self.first(x)))


def batches(sizes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, 3, 4, generator=gen) for size in sizes]


def test_every_batch_reaches_a_linear_before_it_is_used():
    block = Block()
    seen: list[tuple[str, int]] = []

    def on_ready(name, inputs):
        seen.append((name, sum(x.shape[0] for x in inputs)))
        with torch.no_grad():  # "prune": a change every batch must see from here on
            getattr(block, name).weight.mul_(0.5)

    hidden = batches([2, 2, 1])
    expected_block = Block()
    expected_block.load_state_dict(block.state_dict())
    calls = [LayerCall((), {}, False) for _ in hidden]
    with torch.no_grad():
        outputs = Lockstep({"first": block.first, "second": block.second}, len(hidden), on_ready).run(
            block, hidden, calls, CPU
        )
        expected_block.first.weight.mul_(0.5)
        expected_block.second.weight.mul_(0.5)
        expected = expected_block(torch.cat(hidden))
    assert seen == [("first", 5), ("second", 5)]
    assert torch.allclose(torch.cat(outputs), expected, atol=1e-6)


def test_an_error_in_one_batch_stops_all_without_hanging():
    block = Block(fail_on_batch_size=1)
    hidden = batches([2, 2, 1])
    calls = [LayerCall((), {}, False) for _ in hidden]
    with pytest.raises(ValueError, match="boom"):
        Lockstep({"first": block.first, "second": block.second}, len(hidden), lambda n, i: None).run(
            block, hidden, calls, CPU
        )


def test_an_error_while_pruning_surfaces():
    block = Block()
    hidden = batches([1, 1])
    calls = [LayerCall((), {}, False) for _ in hidden]

    def on_ready(name, inputs):
        raise RuntimeError(f"cannot prune {name}")

    with pytest.raises(RuntimeError, match="cannot prune first"):
        Lockstep({"first": block.first, "second": block.second}, len(hidden), on_ready).run(
            block, hidden, calls, CPU
        )
