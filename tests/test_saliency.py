"""Network-loss saliencies (OBD, first-order Taylor) and the global comparison group: closed
forms on a least-squares layer, the driver's masks against naive references, refusals."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from torch import nn

from llmprune import PruneConfig, prune
from llmprune.cli.commands import main
from llmprune.core.patterns import global_prune_counts, prune_count
from llmprune.engine.gradients import gradient_moments, loss_gradients
from llmprune.engine.model import find_decoder_layers
from llmprune.errors import LlmpruneError
from llmprune.methods import FISHER, GRADIENT
from llmprune.methods.loss import obd_scores, taylor_scores
from llmprune.structured.scores import Unit, unit_scores


def least_squares(seed: int = 0) -> tuple[nn.Parameter, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.randn(3, 4, generator=gen))
    return W, torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)


def test_fisher_gradient_obd_and_taylor_equal_their_closed_forms_on_a_least_squares_layer():
    # L_s(W) = ½‖W x_s − y_s‖², a known quadratic in W: ∂L_s/∂W = (W x_s − y_s) x_sᵀ.
    W, X, Y = least_squares()
    losses = (lambda x=x, y=y: 0.5 * (W @ x - y).square().sum() for x, y in zip(X, Y, strict=True))
    found = gradient_moments({"w": W}, losses)
    per_sample = [torch.outer(W.detach() @ x - y, x) for x, y in zip(X, Y, strict=True)]
    mean = sum(per_sample) / len(per_sample)
    fisher = sum(g.square() for g in per_sample) / len(per_sample)
    assert found.sequences == 5
    torch.testing.assert_close(found.mean["w"], mean)
    torch.testing.assert_close(found.fisher["w"], fisher)
    stats = {FISHER: found.fisher["w"], GRADIENT: found.mean["w"]}
    w = W.detach()
    for i in range(3):
        for j in range(4):  # one weight at a time, straight from the definitions
            assert obd_scores(w, stats)[i, j].item() == pytest.approx(0.5 * fisher[i, j].item() * w[i, j].item() ** 2)
            assert taylor_scores(w, stats)[i, j].item() == pytest.approx(abs(mean[i, j].item() * w[i, j].item()))
    assert W.grad is None


def test_the_docstring_worked_example():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    stats = {FISHER: torch.tensor([[4.0, 1.0], [0.0, 2.0]]), GRADIENT: torch.tensor([[0.5, 0.5], [-1.0, 1.0]])}
    assert obd_scores(W, stats).tolist() == [[2.0, 2.0], [0.0, 0.25]]
    assert taylor_scores(W, stats).tolist() == [[0.5, 1.0], [3.0, 0.5]]


def test_global_counts_match_a_stable_sort_of_everything():
    assert global_prune_counts([torch.tensor([[3.0, 1.0]]), torch.tensor([2.0, 2.0, 0.0])], 0.6) == [1, 2]
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        scores = [torch.randint(0, 4, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen) * 0.5
                  for _ in range(3)]
        sparsity = float(torch.rand(1, generator=gen))
        flat = torch.cat(scores)
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.sort(flat, stable=True).indices[:prune_count(flat.numel(), sparsity)]] = True
        naive = [int(part.sum()) for part in chosen.split([s.numel() for s in scores])]
        assert global_prune_counts(scores, sparsity) == naive
    with pytest.raises(LlmpruneError, match="finite"):
        global_prune_counts([torch.tensor([1.0, float("nan")])], 0.5)


def naive_keep(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores.flatten(), stable=True).indices[:count]] = False
    return keep.reshape(scores.shape)


def dense_linears(model: nn.Module) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    layers_path, _ = find_decoder_layers(model)
    return {name: (module, tiny.weight_out_in(module).clone()) for name, module in
            tiny.decoder_linears(model, layers_path).items()}


@pytest.mark.parametrize(("build", "method", "score"), [(tiny.llama, "obd", obd_scores),
                                                       (tiny.gpt2, "taylor", taylor_scores)])
def test_the_driver_prunes_the_lowest_saliencies_of_the_dense_gradients(build, method, score):
    calib = tiny.random_ids(4, 24)
    model = build()
    gradients = loss_gradients(model, calib, torch.device("cpu"))
    dense = dense_linears(model)
    report = prune(model, PruneConfig(method=method, sparsity=0.5, group="layer"), calib, device="cpu")
    assert report.sparsity == pytest.approx(0.5, abs=0.02)  # the linears at 50%, norms and biases dense
    for name, (module, W) in dense.items():
        mean, fisher = gradients.of(name, module)
        expected = naive_keep(score(W, {FISHER: fisher, GRADIENT: mean}), prune_count(W.numel(), 0.5))
        torch.testing.assert_close(tiny.weight_out_in(module), W * expected, msg=name)


@pytest.mark.parametrize("method", ["magnitude", "obd"])
def test_a_global_group_prunes_the_lowest_saliencies_of_the_whole_model(method):
    calib = tiny.random_ids(4, 24)
    model = tiny.llama()
    gradients = loss_gradients(model, calib, torch.device("cpu"))
    dense = dense_linears(model)
    report = prune(model, PruneConfig(method=method, sparsity=0.6, group="global"), calib, device="cpu",
                   gradients=gradients if method == "obd" else None)
    scores = {}
    for name, (module, W) in dense.items():
        _mean, fisher = gradients.of(name, module)
        scores[name] = W.abs() if method == "magnitude" else obd_scores(W, {FISHER: fisher})
    flat = torch.cat([s.flatten() for s in scores.values()])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:prune_count(flat.numel(), 0.6)]] = True
    for (name, (module, W)), gone in zip(dense.items(), pruned.split([s.numel() for s in scores.values()]),
                                         strict=True):
        torch.testing.assert_close(tiny.weight_out_in(module), W * ~gone.reshape(W.shape), msg=name)
    assert report.allocation is not None and report.allocation["kind"] == "global"
    assert len(set(round(s, 6) for s in report.allocation["sparsity"])) > 1  # layers end up apart
    assert report.linear_sparsity == pytest.approx(0.6, abs=2e-5)  # floor(0.6 · all weights) pruned


@pytest.mark.parametrize(("config", "message"), [
    (dict(method="wanda", group="global"), "cannot; use magnitude, obd, taylor"),
    (dict(method="obd", pattern="2:4", group="global"), "fixes"),
    (dict(method="obd", group="global", allocation="owl"), "drop allocation"),
    (dict(method="magnitude", group="global", schedule=(0.3, 0.5)), "drop schedule"),
])
def test_a_global_group_refuses_what_it_cannot_do(config, message):
    with pytest.raises(LlmpruneError, match=message):
        PruneConfig(sparsity=0.5, **config)


def test_obd_refuses_fused_experts_before_any_work():
    events: list = []
    with pytest.raises(LlmpruneError, match="fused expert weights"):
        prune(tiny.qwen3_moe(), PruneConfig(method="obd", sparsity=0.5), tiny.random_ids(2, 16), device="cpu",
              progress=events.append)
    assert events == []


def test_structured_obd_sums_half_fisher_w_squared_over_the_unit():
    weights = {"o": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "q": torch.tensor([[1.0, 1.0], [2.0, 0.0]])}
    grads = {"o": (torch.zeros(2, 2), torch.tensor([[1.0, 0.5], [2.0, 1.0]])),
             "q": (torch.zeros(2, 2), torch.tensor([[2.0, 2.0], [1.0, 1.0]]))}
    units = [Unit({"q": [0]}, [0]), Unit({"q": [1]}, [1])]
    scores = unit_scores("obd", units, weights, "o", {}, grads)
    # unit 0: ½(1·1 + 2·9) + ½(2·1 + 2·1) = 9.5 + 2 ; unit 1: ½(0.5·4 + 1·16) + ½(1·4 + 0) = 9 + 2
    assert scores.tolist() == [11.5, 11.0]


def test_a_sweep_computes_the_gradients_once(tmp_path, llama_dir, text_file, monkeypatch):
    import llmprune.engine.gradients as module
    from llmprune.engine.config import CalibrationConfig
    from llmprune.jobs.spec import EvalConfig
    from llmprune.jobs.sweep import SweepConfig, run_sweep

    calls = []
    real = module.loss_gradients

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import llmprune.engine.driver as driver

    monkeypatch.setattr(module, "loss_gradients", counted)  # the sweep's own call
    monkeypatch.setattr(driver, "loss_gradients", counted)  # and any a point would make itself
    config = SweepConfig(model=str(llama_dir), methods=("obd", "taylor"), sparsities=(0.3, 0.6), patterns=(),
                         calibration=CalibrationConfig(str(text_file), 3, 24),
                         evaluation=EvalConfig(str(text_file), 24, 2), device="cpu")
    record = run_sweep(config, tmp_path / "sweep")
    assert len(calls) == 1
    ppl = {p["key"]: p["ppl"] for p in record["points"]}
    assert len(ppl) == 4 and all(v > 0 for v in ppl.values())


def test_the_cli_runs_obd_end_to_end(tmp_path, llama_dir, text_file, capsys):
    out = tmp_path / "out"
    code = main(["--model", str(llama_dir), "--method", "obd", "--sparsity", "0.5", "--group", "global",
                 "--nsamples", "3", "--seqlen", "24", "--calib", str(text_file), "--eval", str(text_file),
                 "--eval-seqlen", "24", "--eval-windows", "2", "--threads", "1", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "llmprune.json").read_text())
    assert record["method"] == "obd" and record["allocation"]["kind"] == "global"
    assert record["sparsity_of_pruned_linears"] == pytest.approx(0.5, abs=1e-6)
    assert "global comparison group of obd saliencies" in (out / "README.md").read_text()
    capsys.readouterr()
    code = main(["--model", str(llama_dir), "--method", "taylor", "--stream", "on", "--nsamples", "3", "--seqlen",
                 "24", "--calib", str(text_file), "--eval", str(text_file), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "streaming run holds one decoder layer" in err
    assert "eval dense" not in err  # refused before the dense evaluation
    assert not (tmp_path / "s").exists()


def test_gradients_over_a_device_map_equal_those_on_one_device_and_leave_the_model_as_it_was():
    # Two "devices" that torch tells apart (cpu and cpu:0): the layer-by-layer placement with its
    # hooks runs for real; the gradients must not change, nor the model's parameters.
    model = tiny.llama()
    calib = tiny.random_ids(2, 16)
    params = dict(model.named_parameters())
    whole = loss_gradients(model, calib, torch.device("cpu"))
    mapped = loss_gradients(model, calib, torch.device("cpu"), [torch.device("cpu"), torch.device("cpu", 0)])
    for name in whole.mean:
        torch.testing.assert_close(mapped.mean[name], whole.mean[name])
        torch.testing.assert_close(mapped.fisher[name], whole.fisher[name])
    assert all(params[n] is p for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters()) or all(p.grad is None for p in model.parameters())
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())


def test_float16_gradients_are_scaled_so_they_do_not_underflow():
    # ∂L/∂W = 1e-4 · x = 1e-8: below float16's smallest subnormal (6e-8) unless the loss is scaled.
    W = nn.Parameter(torch.full((2, 2), 1e-3, dtype=torch.float16))
    x = torch.full((2,), 1e-4, dtype=torch.float16)
    plain = gradient_moments({"w": W}, [lambda: (W @ x).sum() * 1e-4])
    scaled = gradient_moments({"w": W}, [lambda: (W @ x).sum() * 1e-4], scale=2.0**12)
    assert float(plain.mean["w"].abs().max()) == 0.0
    assert float(scaled.mean["w"][0, 0]) == pytest.approx(1e-8, rel=0.05)
