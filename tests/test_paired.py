"""The least-squares refit toward the dense model's outputs (``model_target``): the known answer
of the refit, the pairing of pruned and dense inputs token for token in the loop, the same
tensors streamed, resumed and in memory, and what is refused."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import tiny
import torch
from test_pieces import problem
from test_pipeline import cancel_at
from test_stream import save, shard_bytes, tensors

import llmprune.engine.driver as driver
from llmprune.core.patterns import Pattern, keep_nm, keep_unstructured
from llmprune.core.stats import CrossDifference
from llmprune.engine.config import CalibrationConfig, PruneConfig, default_recipe
from llmprune.engine.driver import prune
from llmprune.engine.model import find_decoder_layers, find_linears
from llmprune.engine.precision import native_bfloat16, pass_dtype
from llmprune.errors import Cancelled, LlmpruneError
from llmprune.jobs.pipeline import EvalConfig, Job, run
from llmprune.jobs.recipe import job_from_dict
from llmprune.methods import HESSIAN, Options, admm
from llmprune.methods.base import CROSS, SHIFT


def test_the_cross_statistic_known_answer_whatever_the_batching():
    cross = CrossDifference(2)
    cross.add(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]))
    cross.add(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    # 2/n · Σ (x_d − x_p)ᵀ x_p = (2/2)·([2, 2]ᵀ[1, 2] + [1, −1]ᵀ[0, 1]) = [[2, 5], [2, 3]]
    assert torch.equal(cross.value(), torch.tensor([[2.0, 5.0], [2.0, 3.0]]))
    g = torch.Generator().manual_seed(0)
    xp, xd = torch.randn(3, 10, 5, generator=g), torch.randn(3, 10, 5, generator=g)
    whole, split = CrossDifference(5), CrossDifference(5)
    whole.add(xp, xd)
    for a, b in zip(xp.split(1), xd.split(1), strict=True):
        split.add(a, b)
    P, D = xp.reshape(-1, 5).double(), xd.reshape(-1, 5).double()
    reference = 2 * D.T @ P / 30 - 2 * P.T @ P / 30  # G − H, the slow way
    assert torch.allclose(whole.value().double(), reference, atol=1e-5)
    assert torch.allclose(split.value(), whole.value(), atol=1e-6)
    # With the dense inputs equal to the pruned ones there is nothing to shift.
    same = CrossDifference(5)
    same.add(xp, xp)
    assert torch.equal(same.value(), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="differ"):
        CrossDifference(5).add(xp, xd[:2])


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("admm_iterations", [0, 30])
@pytest.mark.parametrize("target", [1.0, 0.5])
def test_the_refit_is_the_least_squares_fit_of_the_mixed_dense_outputs_on_the_support(pattern, admm_iterations,
                                                                                      target):
    # Shrink 0: the refit's answer is, row by row, the plain least-squares fit by the pruned
    # inputs X_p on the support of (1 − t)·X_p w₀ + t·X_d w₀: torch's lstsq, no formula of ours.
    W, Xp, _ = problem(tokens=400)
    g = torch.Generator().manual_seed(5)
    Xd = Xp + 0.4 * torch.randn(Xp.shape, generator=g)
    n = Xp.shape[0]
    stats = {HESSIAN: 2 * Xp.T @ Xp / n, CROSS: 2 * (Xd - Xp).T @ Xp / n}
    options = Options(pattern=Pattern.parse(pattern), shrink=0.0, damp=1e-7, admm_iterations=admm_iterations,
                      cg_iterations=60, model_target=target)
    scores = torch.rand(W.shape, generator=g)
    keep = keep_nm(scores, 2, 4) if pattern == "2:4" else keep_unstructured(scores, 0.5)
    result = admm.refit(W, stats, keep, options)
    assert torch.equal(result.keep, keep) and bool((result.weight[~keep] == 0).all())
    P, D = Xp.double(), Xd.double()
    for r in range(W.shape[0]):
        support = keep[r].nonzero().flatten()
        wanted = (1 - target) * P @ W[r].double() + target * D @ W[r].double()
        expected = torch.linalg.lstsq(P[:, support], wanted[:, None]).solution.flatten()
        assert torch.allclose(result.weight[r, support].double(), expected, atol=2e-4, rtol=2e-4)
    # t = 0, or no cross statistic: the classic refit, bit for bit.
    classic = admm.refit(W, {HESSIAN: stats[HESSIAN]}, keep, replace_target(options, 0.0))
    assert torch.equal(admm.refit(W, stats, keep, replace_target(options, 0.0)).weight, classic.weight)
    assert torch.equal(admm.refit(W, {HESSIAN: stats[HESSIAN]}, keep, options).weight, classic.weight)
    assert not torch.allclose(result.weight, classic.weight, atol=1e-3)


def replace_target(options: Options, target: float) -> Options:
    return dataclasses.replace(options, model_target=target)


def test_the_shift_is_shrunk_as_the_hessian_is():
    # t·(1 − shrink)·D, and none at t = 0.
    _, _, H = problem()
    D = torch.full_like(H, 0.5)
    prepared = admm.prepare({HESSIAN: H, CROSS: D}, Options(shrink=0.4, model_target=0.5))
    assert torch.allclose(prepared[SHIFT], torch.full_like(H, 0.5 * 0.6 * 0.5))
    assert SHIFT not in admm.prepare({HESSIAN: H, CROSS: D}, Options(shrink=0.4))


def inputs_at_linears(model, tokens):
    """Each decoder linear's inputs (by full name) on ``tokens``, one forward with hooks."""
    seen: dict[str, torch.Tensor] = {}
    _, layers = find_decoder_layers(model)
    handles = []
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            def hook(module, args, key=f"{index}.{name}"):
                seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize(("lockstep", "dtype", "tolerance"), [
    (True, "float32", 1e-4), (False, "float32", 1e-4),
    # The dense layer under bfloat16 autocast and the products rounded to bfloat16: the same
    # statistic to about bfloat16's precision of the difference (1.5-3% of its largest entry on
    # this model), and not to float32's (so the bfloat16 pass really ran).
    (True, "bfloat16", 6e-2), (False, "bfloat16", 6e-2)])
def test_each_linear_pairs_its_inputs_with_the_dense_models_token_for_token(lockstep, dtype, tolerance,
                                                                            monkeypatch):
    # Slow reference: after pruning, the pruned model's inputs at each linear are those it was
    # pruned from (true-sequential), and an untouched copy of the dense model gives X_d; the
    # statistic the refit read must be 2/n·X_dᵀX_p of exactly those.
    model = tiny.llama(200, layers=3)
    dense = copy.deepcopy(model)
    tokens = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    read: list[tuple[str, torch.Tensor]] = []
    real = driver._prune_linear

    def watch(name, linear, stats, *args, **kwargs):
        read.append((name, stats.raw()[CROSS]))
        return real(name, linear, stats, *args, **kwargs)

    monkeypatch.setattr(driver, "_prune_linear", watch)
    if not lockstep:
        monkeypatch.setattr(driver, "fits_lockstep", lambda *args, **kwargs: False)
    report = prune(model, PruneConfig("ria", sparsity=0.5, update="admm", admm_iterations=0, model_target=0.3,
                                      pass_dtype=dtype),
                   tokens, batch_size=3)  # batches of 3, 3 and 2 samples
    assert report.one_pass == lockstep and report.model_target == 0.3 and report.pass_dtype == dtype
    pruned_in, dense_in = inputs_at_linears(model, tokens), inputs_at_linears(dense, tokens)
    linears_per_layer = len(find_linears(find_decoder_layers(model)[1][0]))
    assert len(read) == 3 * linears_per_layer
    errors: list[float] = []
    for number, (name, cross) in enumerate(read):
        key = f"{number // linears_per_layer}.{name}"
        xp, xd = pruned_in[key], dense_in[key]
        expected = 2 * (xd - xp).T @ xp / xp.shape[0]
        error = float((cross.double() - expected).abs().max())
        errors.append(error / (float(expected.abs().max()) + 1e-12))
        assert error <= tolerance * float(expected.abs().max()) + 1e-7, key
        if dtype == "bfloat16" and key.startswith("0.") and "q_proj" in key:
            assert torch.equal(cross, torch.zeros_like(cross))  # a norm's output: float32 in both, no shift
    assert (max(errors) > 1e-3) == (dtype == "bfloat16")
    # Layer 0's q/k/v read the embeddings in both models; from there on the inputs differ.
    assert torch.allclose(pruned_in["0.self_attn.q_proj"], dense_in["0.self_attn.q_proj"])
    assert not torch.allclose(pruned_in["1.self_attn.q_proj"], dense_in["1.self_attn.q_proj"], atol=1e-3)


def test_the_bfloat16_statistic_rounds_each_batch_product_once_and_sums_in_float32():
    g = torch.Generator().manual_seed(1)
    xp = torch.randn(4, 64, 8, generator=g)
    xd = xp + 0.1 * torch.randn(4, 64, 8, generator=g)
    exact, rounded = CrossDifference(8), CrossDifference(8, dtype=torch.bfloat16)
    for a, b in zip(xp, xd, strict=True):
        exact.add(a, b)
        rounded.add(a, b)
    # Slow reference: each batch's difference and inputs rounded to bfloat16, multiplied exactly.
    reference = sum((b - a).bfloat16().double().T @ a.bfloat16().double() for a, b in zip(xp, xd, strict=True))
    assert rounded.sum.dtype == torch.float32
    assert torch.allclose(rounded.sum.double(), reference, rtol=1e-2, atol=1e-2)
    scale = float(exact.value().abs().max())
    assert 0 < float((rounded.value() - exact.value()).abs().max()) < 2e-2 * scale


def test_auto_precision_follows_the_devices_native_bfloat16():
    cpu = torch.device("cpu")
    assert pass_dtype("auto", cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)
    assert pass_dtype("float32", cpu) == torch.float32 and pass_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(LlmpruneError, match="pass_dtype must be one of auto, float32, bfloat16"):
        PruneConfig(sparsity=0.5, model_target=0.3, pass_dtype="float16")


def test_the_default_recipe_pulls_the_refit_toward_the_model_unless_recovery_does():
    # README, "The default recipe": 0.3 at every setting; recovery toward the dense model undoes
    # the passed-on error itself (measured: nothing gained), so with recovery the pull is off.
    for pattern in (Pattern(), Pattern.parse("2:4"), Pattern.parse("4:8")):
        for sparsity in (0.5, 0.6, 0.7):
            assert default_recipe(pattern, sparsity)["model_target"] == 0.3
    assert PruneConfig(sparsity=0.5).options().model_target == 0.3
    assert PruneConfig(pattern="2:4").recipe_target
    assert PruneConfig(sparsity=0.5, recover="blockwise").options().model_target == 0.0
    assert PruneConfig(sparsity=0.5, model_target=0.5).options().model_target == 0.5  # the caller's wins
    assert not PruneConfig(sparsity=0.5, model_target=0.5).recipe_target
    assert PruneConfig(sparsity=0.5, recover="blockwise", model_target=0.3).options().model_target == 0.3
    # A named method has none; turning the default's refit off drops the recipe's pull with it.
    assert PruneConfig("ria", sparsity=0.5, update="admm").options().model_target == 0.0
    assert PruneConfig(sparsity=0.5, update="none").options().model_target == 0.0
    assert PruneConfig("sparsegpt", sparsity=0.5, update="admm", model_target=1).options().model_target == 1.0


@pytest.mark.parametrize(("change", "words"), [
    ({"method": "sparsegpt", "model_target": 0.3}, "needs update 'admm', got 'obs'"),
    ({"method": "wanda", "model_target": 0.3}, "needs update 'admm', got 'none'"),
    ({"method": "ria", "update": "admm", "model_target": 1.5}, r"model_target must be in \[0, 1\]"),
    ({"method": "ria", "update": "admm", "model_target": "x"}, "model_target must be"),
])
def test_bad_model_targets_are_refused_before_any_work(change, words):
    with pytest.raises(LlmpruneError, match=words):
        PruneConfig(sparsity=0.5, **change)


def test_a_model_with_experts_refuses_the_target_before_any_work():
    tokens = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    model = tiny.mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (PruneConfig("ria", sparsity=0.5, update="admm", model_target=0.3),
                   PruneConfig(sparsity=0.5, model_target=0.3)):
        with pytest.raises(LlmpruneError, match="model with experts cannot"):
            prune(model, config, tokens)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned


def test_the_default_recipe_runs_a_model_with_experts_without_the_pull():
    # The recipe's pull is dropped (logged), not refused: the default works on any decoder.
    tokens = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    report = prune(tiny.mixtral(), PruneConfig(sparsity=0.5), tokens)
    assert report.model_target == 0.0 and report.sparsity > 0.4


def test_a_record_of_a_model_with_experts_says_the_pull_was_off_and_reruns(tokenizer, text_file, tmp_path):
    # The record's recipe and config hold what ran (0), so rerunning them is not refused.
    source = save(tiny.mixtral(len(tokenizer)), tokenizer, tmp_path / "src")
    job = Job(model=str(source), prune=PruneConfig(sparsity=0.5), calibration=CalibrationConfig(str(text_file), 4, 32,
              generated=0), evaluation=EvalConfig(None), out=str(tmp_path / "first"), device="cpu")
    record = run(job)
    assert job.prune.model_target == 0.3  # asked by the recipe, dropped for the experts
    assert record["config"]["model_target"] == 0.0 == record["recipe"]["prune"]["model_target"]
    again = job_from_dict({**record["recipe"], "out": str(tmp_path / "again")})
    assert run(again)["resolved_options"]["model_target"] == 0.0


def default_job(model, text, out, **kwargs):
    # The default recipe at 50% (its refit pulled toward the dense model); no generated windows
    # (a streamed run has none), so the in-memory run is the same job.
    calibration = CalibrationConfig(str(text), 6, 32, generated=0)
    return Job(model=str(model), prune=PruneConfig(sparsity=0.5), calibration=calibration,
               evaluation=EvalConfig(None), out=str(out), device="cpu", batch_size=2, **kwargs)


def test_streamed_resumed_and_in_memory_runs_write_the_same_tensors_with_the_refit_toward_the_model(
        tokenizer, text_file, tmp_path):
    source = save(tiny.llama(len(tokenizer), layers=4), tokenizer, tmp_path / "src")
    memory = run(default_job(source, text_file, tmp_path / "mem", stream="off"))
    streamed = run(default_job(source, text_file, tmp_path / "str", stream="on"))
    assert memory["resolved_options"]["model_target"] == 0.3 == streamed["resolved_options"]["model_target"]
    resolved = str(pass_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert memory["resolved_options"]["pass_dtype"] == resolved == streamed["resolved_options"]["pass_dtype"]
    expected, actual = tensors(tmp_path / "mem"), tensors(tmp_path / "str")
    assert set(expected) == set(actual) and all(torch.equal(expected[k], actual[k]) for k in expected)
    classic = run(dataclasses.replace(default_job(source, text_file, tmp_path / "classic", stream="off"),
                                      prune=PruneConfig(sparsity=0.5, model_target=0.0)))
    assert classic["resolved_options"]["model_target"] == 0.0
    assert not all(torch.equal(expected[k], v) for k, v in tensors(tmp_path / "classic").items())
    progress, cancel = cancel_at("prune", 2)
    with pytest.raises(Cancelled):
        run(default_job(source, text_file, tmp_path / "cut", stream="on"), progress=progress, cancel=cancel)
    journal = json.loads((tmp_path / ".cut.partial" / ".llmprune-journal" / "journal.json").read_text())
    assert len(journal["layers"]) == 2 and "dense_activations" in journal["layers"][-1]
    resumed = run(default_job(source, text_file, tmp_path / "cut", stream="on", resume=True))
    assert resumed["streaming"]["resumed_at_layer"] == 2
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "str")
    card = (tmp_path / "mem" / "README.md").read_text()
    assert ("refit target: 0.3 of the way from the dense linear on the pruned inputs to the dense model's outputs "
            "at each linear") in card
    assert ("calibration passes in bfloat16" in card) == (resolved == "bfloat16")
    assert "refit target" not in (tmp_path / "classic" / "README.md").read_text()
