"""Sensitivity analysis and the oracle study: known answers, naive references, the allocation,
bad input, and the command line end to end (files checked with Pillow)."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import tiny
import torch
from PIL import Image

from llmprune.analysis.oracle import SaliencyConfig, saliency
from llmprune.analysis.sensitivity import SensitivityConfig, sensitivity
from llmprune.cli.commands import main
from llmprune.core.allocation import sensitivity_sparsities
from llmprune.core.patterns import prune_count
from llmprune.core.ranking import average_ranks, spearman
from llmprune.engine.model import find_decoder_layers
from llmprune.errors import LlmpruneError
from llmprune.eval.perplexity import perplexity

CALIB = tiny.random_ids(4, 24)
WINDOWS = tiny.random_ids(3, 24, seed=5)


def test_spearman_known_answers():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 30, 20, 40])) == pytest.approx(0.8)
    x = torch.tensor([0.3, -1.0, 2.0, 2.0, 5.0])
    assert spearman(x, x) == pytest.approx(1.0)  # a criterion equal to the oracle
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert average_ranks(torch.tensor([3.0, 1, 3, 2])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert math.isnan(spearman(torch.ones(4), x[:4]))  # a constant score ranks nothing


def test_spearman_equals_the_textbook_formula_without_ties():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        a, b = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        n = 9
        assert spearman(a, b) == pytest.approx(1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1)))


def test_sensitivity_near_ratio_zero_is_the_dense_perplexity_and_leaves_the_model_dense():
    model = tiny.llama(layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = perplexity(model, WINDOWS)
    # 1e-9 of a matrix is floor(n · 1e-9) = 0 weights: nothing pruned, every layer's curve exact.
    result = sensitivity(model, SensitivityConfig("wanda", (1e-9, 0.5)), CALIB, WINDOWS, device="cpu")
    assert result.dense_ppl == pytest.approx(dense, rel=1e-6)
    assert all(values[0] == pytest.approx(dense, rel=1e-6) for values in result.curves.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(result.curves) == {"layer 0", "layer 1", "layer 2"}


def test_a_layer_point_equals_pruning_that_layer_alone_and_evaluating_the_whole_model():
    model = tiny.llama(layers=3)
    result = sensitivity(model, SensitivityConfig("magnitude", (0.6,), layers=(1,)), CALIB, WINDOWS, device="cpu")
    naive = copy.deepcopy(model)
    layers_path, _ = find_decoder_layers(naive)
    for name, module in tiny.decoder_linears(naive, layers_path).items():
        if name.startswith(f"{layers_path}.1."):
            W = module.weight.detach()
            flat = W.abs().flatten()
            gone = torch.zeros_like(flat, dtype=torch.bool)
            gone[torch.sort(flat, stable=True).indices[:prune_count(flat.numel(), 0.6)]] = True
            module.weight.data = W * ~gone.reshape(W.shape)
    assert result.curves == {"layer 1": [pytest.approx(perplexity(naive, WINDOWS), rel=1e-5)]}


def test_sensitivity_by_kind_prunes_that_kind_in_every_layer():
    model = tiny.llama(layers=2)
    result = sensitivity(model, SensitivityConfig("magnitude", (0.5,), by="kinds"), CALIB, WINDOWS, device="cpu")
    assert list(result.curves) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    naive = copy.deepcopy(model)
    for name, module in tiny.decoder_linears(naive, "model.layers").items():
        if name.endswith("down_proj"):
            W = module.weight.detach()
            gone = torch.zeros(W.numel(), dtype=torch.bool)
            gone[torch.sort(W.abs().flatten(), stable=True).indices[:prune_count(W.numel(), 0.5)]] = True
            module.weight.data = W * ~gone.reshape(W.shape)
    assert result.curves["down_proj"][0] == pytest.approx(perplexity(naive, WINDOWS), rel=1e-5)


@pytest.mark.parametrize(("config", "message"), [
    (dict(ratios=(0.0, 0.5)), r"in \(0, 1\)"), (dict(ratios=(0.5, 1.0)), r"in \(0, 1\)"),
    (dict(ratios=(0.5, 0.3)), "rise"), (dict(method="nope"), "unknown method"),
    (dict(by="heads"), "layers' or 'kinds'"), (dict(by="kinds", layers=(0,)), "every layer"),
])
def test_sensitivity_refuses_bad_settings(config, message):
    with pytest.raises(LlmpruneError, match=message):
        SensitivityConfig(**config)


def test_sensitivity_refuses_an_unknown_layer_before_any_work():
    events: list = []
    with pytest.raises(LlmpruneError, match="layer 7 does not exist"):
        sensitivity(tiny.llama(), SensitivityConfig(layers=(7,)), CALIB, WINDOWS, progress=events.append)
    assert events == []


def test_the_allocation_from_curves_keeps_the_mean_exact_and_spares_sensitive_layers():
    assert sensitivity_sparsities([0.4, 0.8], [[0.1, 0.2], [1.0, 3.0]], [10, 10], 0.4) == [0.8, 0.0]
    gen = torch.Generator().manual_seed(0)
    ratios = [0.3, 0.5, 0.7, 0.9]
    for _ in range(50):
        costs = (torch.rand(6, 4, generator=gen).cumsum(1) * torch.rand(6, 1, generator=gen) * 3).tolist()
        sizes = torch.randint(10, 1000, (6,), generator=gen).tolist()
        target = float(torch.rand(1, generator=gen)) * 0.9
        out = sensitivity_sparsities(ratios, costs, sizes, target)
        assert sum(s * n for s, n in zip(out, sizes, strict=True)) / sum(sizes) == pytest.approx(target, abs=1e-12)
        assert all(0 <= s <= 0.9 + 1e-12 for s in out)
    flat, steep = [0.01, 0.02, 0.03, 0.05], [0.5, 1.0, 2.0, 4.0]
    out = sensitivity_sparsities(ratios, [steep, flat, flat], [100, 100, 100], 0.5)
    assert out[0] < 0.5 < out[1] == out[2]
    with pytest.raises(LlmpruneError, match=r"reach sparsity 0\.9"):
        sensitivity_sparsities(ratios, [flat], [10], 0.95)


def test_the_oracle_of_a_unit_whose_removal_changes_nothing_is_zero():
    model = tiny.llama(layers=2)
    o_proj = model.model.layers[1].self_attn.o_proj
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        o_proj.weight[:, 2 * d:3 * d] = 0  # head 2 of layer 1 already contributes nothing
    result = saliency(model, SaliencyConfig(units=("heads",), layers=(1,), criteria=("magnitude", "random")), CALIB,
                      device="cpu")
    (study,) = result.studies
    assert study.oracle[2] == 0.0
    assert all(v != 0.0 for i, v in enumerate(study.oracle) if i != 2)


@pytest.mark.parametrize("samples", [None, 2])
def test_each_oracle_value_is_the_exact_loss_change_of_the_model_without_that_unit(samples):
    model = tiny.llama(layers=2)
    result = saliency(model, SaliencyConfig(layers=(0,), channel_group=32, oracle_samples=samples), CALIB,
                      device="cpu")
    heads, channels = result.studies
    judged = CALIB[:samples] if samples else CALIB

    def loss(m) -> float:
        with torch.no_grad():
            return float(m(input_ids=judged, labels=judged).loss)

    assert result.dense_loss == pytest.approx(loss(model), rel=1e-5)
    naive = copy.deepcopy(model)
    with torch.no_grad():
        naive.model.layers[0].mlp.down_proj.weight[:, 32:64] = 0  # channel group 1
    assert channels.oracle[1] == pytest.approx(loss(naive) - result.dense_loss, rel=1e-4, abs=1e-6)
    assert len(heads.oracle) == model.config.num_attention_heads and len(channels.oracle) == 128 // 32
    assert set(heads.spearman) == {"magnitude", "wanda-sp", "flap", "taylor", "obd", "obs", "random"}
    assert all(-1 <= v <= 1 for v in heads.spearman.values())


@pytest.mark.parametrize(("config", "model", "message"), [
    (dict(layers=(5,)), tiny.llama, "layer 5 does not exist"),
    (dict(units=("channels",)), tiny.gpt2, "MLP channels cannot be expressed"),
    (dict(channel_group=1000), tiny.llama, "wider than the MLP"),
])
def test_the_oracle_study_refuses_bad_input_before_any_work(config, model, message):
    events: list = []
    with pytest.raises(LlmpruneError, match=message):
        saliency(model(), SaliencyConfig(**config), CALIB, progress=events.append)
    assert events == []


@pytest.mark.parametrize(("config", "message"), [
    (dict(units=("experts",)), "heads and/or channels"), (dict(criteria=("psychic",)), "criteria must be"),
    (dict(channel_group=0), "positive"),
])
def test_saliency_config_refuses_bad_settings(config, message):
    with pytest.raises(LlmpruneError, match=message):
        SaliencyConfig(**config)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_the_cli_writes_sensitivity_json_csv_and_png_and_the_allocation_uses_them(tmp_path, llama_dir, text_file,
                                                                                 capsys):
    common = ["--model", str(llama_dir), "--calib", str(text_file), "--nsamples", "3", "--seqlen", "24",
              "--threads", "1", "--quiet"]
    out = tmp_path / "sens"
    code = main(["analyze", "sensitivity", *common, "--ratios", "0.3,0.6,0.9", "--eval", str(text_file),
                 "--eval-seqlen", "24", "--eval-windows", "2", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = json.loads((out / "sensitivity.json").read_text())
    assert record["ratios"] == [0.3, 0.6, 0.9] and set(record["curves"]) == {"layer 0", "layer 1"}
    assert record["ranking"][0] in printed.out.splitlines()[2]
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    assert len(rows) == 1 + 2 * 3
    assert png_size(out / "sensitivity.png")[0] > 400
    again = main(["analyze", "sensitivity", *common, "--eval", str(text_file), "--out", str(out)])
    assert again == 2 and "already exists" in capsys.readouterr().err
    pruned = tmp_path / "pruned"
    code = main([*common, "--method", "magnitude", "--sparsity", "0.5", "--allocation", "sensitivity", "--sensitivity",
                 str(out / "sensitivity.json"), "--eval", "none", "--out", str(pruned)])
    assert code == 0, capsys.readouterr().err
    made = json.loads((pruned / "llmprune.json").read_text())
    assert made["allocation"]["kind"] == "sensitivity"
    assert made["sparsity_of_pruned_linears"] == pytest.approx(0.5, abs=1e-3)
    assert len(set(round(s, 4) for s in made["allocation"]["sparsity"])) == 2  # the layers differ


def test_the_cli_writes_the_saliency_files(tmp_path, llama_dir, text_file, capsys):
    out = tmp_path / "sal"
    code = main(["analyze", "saliency", "--model", str(llama_dir), "--calib", str(text_file), "--nsamples", "3",
                 "--seqlen", "24", "--layers", "0,1", "--channel-group", "32", "--quiet", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = json.loads((out / "saliency.json").read_text())
    assert [(s["layer"], s["unit"]) for s in record["studies"]] == [(0, "heads"), (0, "channels"), (1, "heads"),
                                                                    (1, "channels")]
    assert record["best"] in record["mean_spearman"] and "best match to the oracle" in printed.out
    for name in ("saliency-layer-0.png", "saliency-layer-1.png", "saliency-spearman.png"):
        assert min(png_size(out / name)) > 200
    assert len(list(csv.DictReader((out / "saliency.csv").open()))) == 2 * (4 + 4)
    card_run = tmp_path / "heads"
    code = main(["--model", str(llama_dir), "--pattern", "heads", "--sparsity", "0.25", "--calib", str(text_file),
                 "--nsamples", "3", "--seqlen", "24", "--eval", "none", "--decode-tokens", "0", "--quiet",
                 "--saliency", str(out / "saliency.json"), "--out", str(card_run)])
    assert code == 0, capsys.readouterr().err
    card = (card_run / "README.md").read_text()
    assert "## Saliency criteria against the oracle" in card and f"best: **{record['best']}**" in card
    assert json.loads((card_run / "llmprune.json").read_text())["saliency"]["best"] == record["best"]
    code = main(["--model", str(llama_dir), "--sparsity", "0.5", "--saliency", str(out / "saliency.json"),
                 "--out", str(tmp_path / "u")])
    assert code == 2 and "structured run's model card" in capsys.readouterr().err
    code = main(["analyze", "saliency", "--model", str(llama_dir), "--calib", str(text_file), "--nsamples", "2",
                 "--seqlen", "24", "--layers", "9", "--out", str(tmp_path / "x")])
    assert code == 2 and "layer 9 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("by", ["layers", "kinds"])
def test_a_cancelled_sensitivity_run_leaves_the_model_dense(by):
    from llmprune.errors import Cancelled

    model = tiny.llama(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events: list = []
    stage = "sensitivity" if by == "layers" else "sensitivity walk"
    with pytest.raises(Cancelled):
        sensitivity(model, SensitivityConfig("magnitude", (0.5, 0.7), by=by), CALIB, WINDOWS, device="cpu",
                    progress=events.append, cancel=lambda: any(e.stage == stage and e.done >= 1 for e in events))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_cancelled_oracle_study_leaves_the_model_dense():
    from llmprune.errors import Cancelled

    model = tiny.llama(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events: list = []
    with pytest.raises(Cancelled):
        saliency(model, SaliencyConfig(criteria=("magnitude",)), CALIB, device="cpu", progress=events.append,
                 cancel=lambda: any(e.stage == "oracle" and e.done >= 2 for e in events))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_service_confines_the_curves_and_the_saliency_file(tmp_path):
    from llmprune.service.rules import confine

    data = tmp_path / "data"
    data.mkdir()
    (data / "sensitivity.json").write_text("{}")
    (tmp_path / "outside.json").write_text("{}")
    inside = confine({"prune": {"sensitivity": "sensitivity.json"}, "saliency": "sensitivity.json"}, [], [data])
    assert inside["prune"]["sensitivity"] == str((data / "sensitivity.json").resolve())
    for recipe in ({"prune": {"sensitivity": str(tmp_path / "outside.json")}}, {"saliency": "../outside.json"}):
        with pytest.raises(LlmpruneError, match=r"not a .* under the service's folders"):
            confine(recipe, [], [data])


def test_sensitivity_by_layers_runs_on_fused_experts_and_restores_them():
    model = tiny.qwen3_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sensitivity(model, SensitivityConfig("wanda", (0.5,)), CALIB, WINDOWS, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(values[0] != result.dense_ppl for values in result.curves.values())
    with pytest.raises(LlmpruneError, match="experts are fused"):
        sensitivity(model, SensitivityConfig("wanda", (0.5,), by="kinds"), CALIB, WINDOWS, device="cpu")


def test_sensitivity_with_obd_prunes_the_layer_alone_by_its_own_saliencies():
    model = tiny.llama(layers=2)
    result = sensitivity(model, SensitivityConfig("obd", (0.5,)), CALIB, WINDOWS, device="cpu")
    assert set(result.curves) == {"layer 0", "layer 1"}
    assert all(values[0] != result.dense_ppl for values in result.curves.values())


@pytest.mark.parametrize("where", ["sensitivity", "oracle"])
def test_a_failure_in_the_middle_of_a_point_leaves_the_model_dense(where, monkeypatch):
    import llmprune.analysis.oracle as oracle_module
    import llmprune.analysis.sensitivity as sensitivity_module

    module = sensitivity_module if where == "sensitivity" else oracle_module
    real, calls = module.nll_from, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second point's evaluation, with a layer pruned (a unit removed)
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "nll_from", failing)
    model = tiny.llama(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="out of memory"):
        if where == "sensitivity":
            sensitivity(model, SensitivityConfig("magnitude", (0.5, 0.7)), CALIB, WINDOWS, device="cpu")
        else:
            saliency(model, SaliencyConfig(criteria=("magnitude",)), CALIB, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreadable_or_foreign_curves_are_refused_in_one_line(tmp_path, llama_dir, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "saliency"}))
    for path, message in ((tmp_path / "missing.json", "cannot read"), (broken, "is not JSON"),
                          (other, "is not the sensitivity.json")):
        code = main(["--model", str(llama_dir), "--sparsity", "0.5", "--allocation", "sensitivity", "--sensitivity",
                     str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
