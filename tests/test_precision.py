"""The calibration passes in bfloat16 (``pass_dtype``): the statistics are those of the pruned
layer as it is at each linear (no stale cast of a weight pruned mid-pass), both paths through a
layer agree, the solves stay in float32, and what the configuration and the record say."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
from test_paired import inputs_at_linears

import llmprune.engine.driver as driver
from llmprune.core.patterns import Pattern
from llmprune.core.stats import Hessian
from llmprune.engine.config import PruneConfig, default_recipe
from llmprune.engine.driver import prune
from llmprune.engine.model import find_decoder_layers, find_linears
from llmprune.engine.precision import calibration_pass, layer_pass_dtype, native_bfloat16, pass_dtype
from llmprune.errors import LlmpruneError
from llmprune.methods import HESSIAN


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(seed))


def hessians_read(monkeypatch, lockstep: bool) -> list[tuple[str, torch.Tensor]]:
    read: list[tuple[str, torch.Tensor]] = []
    real = driver._prune_linear

    def watch(name, linear, stats, *args, **kwargs):
        read.append((name, stats.raw()[HESSIAN].clone()))
        return real(name, linear, stats, *args, **kwargs)

    monkeypatch.setattr(driver, "_prune_linear", watch)
    monkeypatch.setattr(driver, "fits_lockstep", lambda *args, **kwargs: lockstep)
    return read


@pytest.mark.parametrize("lockstep", [True, False])
def test_bfloat16_passes_read_each_linear_as_the_pruned_layer_feeds_it(lockstep, monkeypatch):
    # Slow reference: the final pruned model run under the same autocast gives each linear's
    # inputs as the true-sequential pass must have seen them (q/k/v already pruned when o_proj's
    # statistics are taken). A cast of q/k/v's dense weights kept from before their pruning (the
    # autocast cache) would give o_proj the dense model's inputs instead: checked to be far off.
    model = tiny.llama(200, layers=2)
    dense = copy.deepcopy(model)
    read = hessians_read(monkeypatch, lockstep)
    report = prune(model, PruneConfig("sparsegpt", sparsity=0.5, pass_dtype="bfloat16"), tokens(), batch_size=3)
    assert report.one_pass == lockstep and report.pass_dtype == "bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pruned_in, dense_in = inputs_at_linears(model, tokens()), inputs_at_linears(dense, tokens())
    per_layer = len(find_linears(find_decoder_layers(model)[1][0]))
    assert len(read) == 2 * per_layer
    for number, (name, hessian) in enumerate(read):
        key = f"{number // per_layer}.{name}"
        x = pruned_in[key].float()
        expected = 2 * x.T @ x / x.shape[0]
        scale = float(expected.abs().max())
        assert float((hessian - expected).abs().max()) <= 2e-2 * scale, key
        if key == "0.self_attn.o_proj":
            stale = 2 * dense_in[key].float().T @ dense_in[key].float() / x.shape[0]
            assert float((stale - expected).abs().max()) > 0.1 * scale


def test_both_paths_through_a_layer_give_the_same_bfloat16_pruning(monkeypatch):
    # Lockstep (every batch a greenlet inside one autocast region) and group by group (a pass
    # per group) run the same products on the same batches: the same weights, bit for bit.
    results = []
    for lockstep in (True, False):
        model = tiny.llama(200, layers=2)
        monkeypatch.setattr(driver, "fits_lockstep", lambda *args, lockstep=lockstep, **kwargs: lockstep)
        prune(model, PruneConfig(sparsity=0.5, pass_dtype="bfloat16", model_target=0.3), tokens(), batch_size=3)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_the_solves_stay_in_float32_and_land_near_the_float32_passes():
    models = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny.llama(200, layers=2)
        prune(model, PruneConfig(sparsity=0.5, pass_dtype=dtype), tokens(), batch_size=3)
        models[dtype] = model
    for name, weight in models["bfloat16"].named_parameters():
        other = dict(models["float32"].named_parameters())[name]
        assert weight.dtype == torch.float32
        if "proj" in name:
            # The same sparsity; the masks chosen from activations rounded to bfloat16 mostly agree.
            assert int((weight == 0).sum()) == int((other == 0).sum())
            assert float(((weight == 0) == (other == 0)).float().mean()) > 0.9, name


def test_a_pass_leaves_a_16_bit_layer_as_it_is():
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with calibration_pass(layer, torch.device("cpu"), torch.bfloat16):
        assert not torch.is_autocast_enabled("cpu")
    wide = torch.nn.Linear(4, 4)
    with calibration_pass(wide, torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
    with calibration_pass(wide, torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    # Nor are its statistics multiplied in bfloat16: a 16-bit layer keeps float32 products.
    cpu = torch.device("cpu")
    assert layer_pass_dtype("bfloat16", cpu, layer) == torch.float32
    assert layer_pass_dtype("bfloat16", cpu, wide) == torch.bfloat16
    assert layer_pass_dtype("float32", cpu, wide) == torch.float32


def test_named_methods_pass_in_float32_and_the_default_recipe_asks_for_auto():
    assert PruneConfig("sparsegpt", sparsity=0.5).pass_dtype == "float32"
    assert PruneConfig("wanda", sparsity=0.5, pass_dtype="bfloat16").pass_dtype == "bfloat16"
    for pattern in (Pattern(), Pattern.parse("2:4"), Pattern.parse("4:8")):
        for sparsity in (0.5, 0.6, 0.7):
            assert default_recipe(pattern, sparsity)["pass_dtype"] == "auto"
    assert PruneConfig(sparsity=0.5).pass_dtype == "auto"
    assert PruneConfig(sparsity=0.5, pass_dtype="float32").pass_dtype == "float32"  # a flag wins
    cpu = torch.device("cpu")
    assert pass_dtype("auto", cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)


def test_a_bad_pass_dtype_is_refused_in_one_line_before_any_work():
    with pytest.raises(LlmpruneError, match="pass_dtype must be one of auto, float32, bfloat16, got 'half'"):
        PruneConfig(sparsity=0.5, pass_dtype="half")


def test_the_bfloat16_hessian_is_the_product_of_rounded_rows_summed_in_float32():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 40, 12, generator=g) for _ in range(3)]
    exact, rounded = Hessian(12), Hessian(12, dtype=torch.bfloat16)
    for x in batches:
        exact.add(x)
        rounded.add(x)
    # Slow reference: each batch's rows rounded to bfloat16, multiplied exactly, summed.
    rows = [x.reshape(-1, 12).bfloat16().double() for x in batches]
    reference = 2 * sum(r.T @ r for r in rows) / 240
    value = rounded.value()
    assert rounded.sum.dtype == torch.float32 and torch.equal(value, value.T)
    assert torch.allclose(value.double(), reference, rtol=1e-2, atol=1e-2)
    gap = float((value - exact.value()).abs().max())
    assert 0 < gap < 2e-2 * float(exact.value().abs().max())
