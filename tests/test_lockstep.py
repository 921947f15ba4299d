"""Batches in lockstep: every linear sees all batches' inputs before it runs on any of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmprune.engine.capture import LayerCall
from llmprune.engine.config import PruneConfig
from llmprune.engine.driver import prune_layer
from llmprune.engine.lockstep import Diverged, Lockstep
from llmprune.methods import get_method

CPU = torch.device("cpu")
CALL = LayerCall(args=(), kwargs={}, hidden_as_kwarg=False)


class TwoStep(nn.Module):
    """a feeds b; ``b`` is skipped for inputs whose first element is negative when ``route``."""

    def __init__(self, route: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.route and x.flatten()[0] < 0:
            return h
        return self.b(h)


def batches(signs: list[float]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for sign in signs:
        x = torch.randn(2, 3, 8, generator=gen)
        x.view(-1)[0] = sign * x.view(-1)[0].abs()
        out.append(x)
    return out


def test_each_linear_sees_every_batch_before_running():
    layer = TwoStep()
    hidden = batches([1, 1, 1])
    seen: list[tuple[str, int, torch.Tensor]] = []

    def on_arrival(name: str, inputs: list[torch.Tensor]) -> None:
        seen.append((name, len(inputs), torch.cat(inputs)))
        if name == "a":  # change the weight: every batch must then run with the new one
            layer.a.weight.mul_(2)

    with torch.no_grad():
        outputs = Lockstep(dict(layer.named_children()), on_arrival).run(layer, hidden, [CALL] * 3, CPU)
        expected = [layer(x) for x in hidden]  # a is already doubled
    assert [(name, count) for name, count, _ in seen] == [("a", 3), ("b", 3)]
    assert torch.equal(seen[0][2], torch.cat(hidden))
    assert torch.equal(seen[1][2], torch.cat([torch.relu(layer.a(x)) for x in hidden]).detach())
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got, want)
    assert not layer.a._forward_pre_hooks and not layer.b._forward_pre_hooks


def test_batches_on_different_paths_stop_with_diverged():
    layer = TwoStep(route=True)
    arrived = []
    with pytest.raises(Diverged), torch.no_grad():
        Lockstep(dict(layer.named_children()), lambda name, xs: arrived.append(name)).run(
            layer, batches([1, -1]), [CALL] * 2, CPU)
    assert arrived == ["a"]
    assert not layer.a._forward_pre_hooks and not layer.b._forward_pre_hooks


def test_outputs_go_to_the_sink_in_batch_order_as_they_finish():
    layer = TwoStep()
    hidden = batches([1, 1, 1])

    with torch.no_grad():
        expected = [layer(x) for x in hidden]

    class Sink(list[torch.Tensor]):
        def append(self, tensor: torch.Tensor, /) -> None:
            assert torch.equal(tensor, expected[len(self)])  # batch len(self), finished now
            super().append(tensor)

    sink = Sink()
    with torch.no_grad():
        returned = Lockstep(dict(layer.named_children()), lambda name, xs: None).run(
            layer, hidden, [CALL] * 3, CPU, sink)
    assert returned is sink and len(sink) == 3


@pytest.mark.parametrize("signs", [[1, -1, 1], [-1, 1, 1]])
def test_a_diverging_layer_is_finished_group_by_group(signs):
    """prune_layer falls back to one pass per group and gets what that path gets from the start,
    also when the first batches finished (and were stored) before the run diverged."""
    method = get_method("wanda")
    options = PruneConfig(method="wanda", sparsity=0.5).options()
    hidden = batches(signs)
    results = {}
    for lockstep in (True, False):
        layer = TwoStep(route=True)
        with torch.no_grad():
            outputs, reports = prune_layer(layer, hidden, [CALL] * 3, method, options, sequential=True,
                                           device=CPU, lockstep=lockstep)
        results[lockstep] = (layer.a.weight.clone(), layer.b.weight.clone(), outputs)
        assert sorted(r.name for r in reports) == ["a", "b"]
        assert len(outputs) == len(hidden)
    for got, want in zip(results[True][:2], results[False][:2], strict=True):
        assert torch.equal(got, want)
        assert (got == 0).float().mean().item() == 0.5
    for got, want in zip(results[True][2], results[False][2], strict=True):
        assert torch.equal(got, want)


class Parallel(nn.Module):
    """q and k read x, o reads their product, then g reads x again (a parallel block's MLP)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.o, self.g = (nn.Linear(8, 8, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) * self.k(x)) + self.g(x)


@pytest.mark.parametrize("lockstep", [True, False])
def test_a_group_s_statistics_are_freed_after_its_last_linear(lockstep):
    import gc
    import weakref

    from llmprune.engine.driver import visit_layer
    from llmprune.methods.base import HESSIAN

    layer, hidden = Parallel(), batches([1, 1, 1])
    alive: dict[str, bool] = {}
    refs: dict[str, weakref.ref] = {}
    hessians: dict[str, torch.Tensor] = {}

    def on_ready(name: str, stats) -> None:
        gc.collect()
        alive[name] = all(ref() is not None for ref in refs.values())
        refs[name] = weakref.ref(stats)
        hessians[name] = stats.raw()[HESSIAN].clone()

    with torch.no_grad():
        visit_layer(layer, hidden, [CALL] * 3, dict(layer.named_children()), {HESSIAN}, on_ready, True, CPU,
                    lockstep)
    assert list(hessians) == ["q", "k", "o", "g"]
    assert alive["k"]  # q's statistics are k's: shared, not copied
    assert not alive["o"] and not alive["g"]  # q/k's went once o's input arrived
    x = torch.cat(hidden).reshape(-1, 8)
    # g reads x again: its statistics, rebuilt, are exactly q's
    assert torch.equal(hessians["g"], hessians["q"])
    torch.testing.assert_close(hessians["q"], 2 * x.T @ x / x.shape[0])


def test_the_lockstep_budget_follows_free_memory(monkeypatch):
    import llmprune.engine.driver as driver

    monkeypatch.setattr(driver, "available_bytes", lambda: 24 * 10**9)  # this project's CI machine
    assert driver.lockstep_budget(CPU) == 8 * 10**9 // (4 * 3)  # a third of it, 3 fp32 copies
    # SmolLM2's default run (128 x 2048 tokens, MLP width 1536) now takes one pass per layer;
    # Llama-3.1-8B's (width 14336) would need 45 GB of activations and takes one per group.
    assert driver.fits_lockstep(128, 2048, 1536, device=CPU)
    assert not driver.fits_lockstep(128, 2048, 14336, device=CPU)
    monkeypatch.setattr(driver, "available_bytes", lambda: 2 * 10**9)
    assert driver.lockstep_budget(CPU) == driver.LOCKSTEP_BUDGET  # never below the fixed floor
    monkeypatch.setattr(driver, "available_bytes", lambda: None)
    assert driver.lockstep_budget(CPU) == driver.LOCKSTEP_BUDGET


def test_eager_attention_counts_its_probabilities_in_the_lockstep_budget():
    import tiny

    from llmprune.engine.model import eager_attention_width

    model = tiny.llama()
    model.config._attn_implementation = "eager"  # every waiting batch holds heads x seq x seq probabilities
    assert eager_attention_width(model, 2048) == model.config.num_attention_heads * 2048
    model.config._attn_implementation = "sdpa"
    assert eager_attention_width(model, 2048) == 0
