"""Block-wise recovery and OWL allocation inside the one-layer-at-a-time loop: zeros and N:M
groups kept, the held-out error never raised, the same tensors streamed, resumed and in memory."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from test_pipeline import cancel_at
from test_stream import save, shard_bytes, tensors

from llmprune.engine.capture import LayerCall, capture_layer_calls
from llmprune.engine.config import RECOVER_BATCH, RECOVER_LR, CalibrationConfig, PruneConfig
from llmprune.engine.driver import given_norms_fit, prune, visit_layer
from llmprune.engine.experts import unfused
from llmprune.engine.model import find_decoder_layers, find_linears, get_weight
from llmprune.engine.observe import InputNorms, plain_layers
from llmprune.engine.recover import (
    RecoverSettings,
    dense_targets,
    mlp_block,
    mlp_regression,
    recover_layer,
    step_size,
)
from llmprune.errors import Cancelled, LlmpruneError
from llmprune.jobs.pipeline import EvalConfig, Job, run
from llmprune.methods.base import COLUMN_NORMS, HESSIAN

CPU = torch.device("cpu")


def ids(samples=16, seqlen=32, seed=0):
    return torch.randint(0, 200, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def first_layer_inputs(model, batches):
    _, layers = find_decoder_layers(model)
    hidden, calls = capture_layer_calls(model, layers, list(batches.split(4)))
    return layers[0], hidden, calls[0]


def prune_at_random(layer, sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in find_linears(layer).values():
            weight = get_weight(linear)
            weight.mul_(torch.rand(weight.shape, generator=g) >= sparsity)


def correlated(model, rank=8):
    """Embeddings of rank 8: the layer inputs are correlated, as a real model's are (with
    isotropic inputs the masked weights are already the least-squares answer: nothing to win)."""
    g = torch.Generator().manual_seed(1)
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape[0], rank, generator=g)
                        @ torch.randn(rank, embedding.shape[1], generator=g) * 0.1)
    return model


def test_recovery_of_a_randomly_pruned_layer_wins_back_a_share_of_its_error_and_keeps_the_zeros():
    model = correlated(tiny.llama(200, layers=2))
    layer, hidden, calls = first_layer_inputs(model, ids())
    targets = dense_targets(layer, hidden, calls, torch.device("cpu"))
    prune_at_random(layer)
    zeros = {n: get_weight(m) == 0 for n, m in find_linears(layer).items()}
    result = recover_layer(layer, hidden, calls, *targets, CPU, RecoverSettings(30, 1e-3, "constant", "last"))
    assert result["kept"] and result["error_after"] < 0.8 * result["error_before"], result
    for name, linear in find_linears(layer).items():
        assert torch.equal(get_weight(linear) == 0, zeros[name]), name  # no zero grew back, none added


def test_a_recovery_that_does_not_help_is_undone():
    model = tiny.llama(200, layers=2)
    layer, hidden, calls = first_layer_inputs(model, ids())
    targets = dense_targets(layer, hidden, calls, torch.device("cpu"))
    prune_at_random(layer)
    before = {n: get_weight(m).clone() for n, m in find_linears(layer).items()}
    result = recover_layer(layer, hidden, calls, *targets, CPU, RecoverSettings(2, 10.0, "constant", "last"))
    assert not result["kept"] and result["error_trained"] >= result["error_before"]
    assert result["error_after"] == result["error_before"]
    assert all(torch.equal(get_weight(m), before[n]) for n, m in find_linears(layer).items())


def test_the_step_falls_on_a_cosine_from_the_learning_rate_to_zero():
    cosine, constant = RecoverSettings(2, 0.004, "cosine", "last"), RecoverSettings(2, 0.004, "constant", "last")
    # 0.004 · (1 + cos(π·k/4)) / 2 for k = 0..3
    assert [step_size(cosine, k, 4) for k in range(4)] == pytest.approx([0.004, 0.0034142136, 0.002, 0.00058578644])
    assert [step_size(constant, step, 4) for step in range(4)] == [0.004] * 4


def test_with_keep_best_each_stage_ends_on_its_best_epoch_by_the_held_out_error():
    # A constant step of 0.1 overshoots: the MLP stage's epochs all end above its start, so it
    # must end on its starting weights (the last epoch's would be worse), and the layer's
    # error is the lowest the stages saw. With "last" nothing is measured per epoch.
    model = correlated(tiny.llama(200, layers=2))
    layer, hidden, calls = first_layer_inputs(model, ids())
    targets = dense_targets(layer, hidden, calls, torch.device("cpu"))
    prune_at_random(layer)
    pruned = {n: get_weight(m).clone() for n, m in find_linears(layer).items()}
    last = recover_layer(layer, hidden, calls, *targets, CPU, RecoverSettings(6, 0.1, "constant", "last"))
    assert last["epoch_errors"] == {"attention": [], "mlp": []}
    with torch.no_grad():
        for name, linear in find_linears(layer).items():
            get_weight(linear).copy_(pruned[name])
    result = recover_layer(layer, hidden, calls, *targets, CPU, RecoverSettings(6, 0.1, "constant", "best"))
    attention, mlp = result["epoch_errors"]["attention"], result["epoch_errors"]["mlp"]
    assert len(attention) == len(mlp) == 7 and attention[0] == result["error_before"]
    assert mlp[0] == pytest.approx(min(attention), rel=1e-6)  # the MLP stage starts from the best attention
    assert min(mlp) < mlp[-1]  # the scenario: the last epoch is not the best
    assert result["kept"] and result["error_after"] == pytest.approx(min(mlp), rel=1e-6)
    assert result["error_after"] < result["error_before"] and result["error_trained"] < last["error_trained"]


@pytest.mark.parametrize(("pattern", "method"), [("2:4", "wanda"), ("unstructured", "sparsegpt")])
def test_recovery_in_the_loop_keeps_the_pattern_and_never_raises_the_held_out_error(pattern, method):
    model = tiny.llama(200, layers=3)
    report = prune(model, PruneConfig(method, pattern, recover="blockwise", recover_lr=1e-3), ids(), batch_size=4)
    assert report.sparsity == 0.5 and len(report.recovery) == 3
    for r in report.recovery:  # kept only when it helped; undone (the error unchanged) otherwise
        assert r["error_after"] == (r["error_trained"] if r["kept"] else r["error_before"])
        assert r["error_trained"] < r["error_before"] if r["kept"] else r["error_trained"] >= r["error_before"]
    assert any(r["kept"] for r in report.recovery)
    if pattern == "2:4":
        _, layers = find_decoder_layers(model)
        for layer in layers:
            for name, linear in find_linears(layer).items():
                kept = get_weight(linear) != 0
                assert bool((kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2).all()), name


@pytest.mark.parametrize("target", ["model", "layer"])
def test_recovery_targets_are_the_dense_models_own_activations_or_the_dense_layer_on_pruned_inputs(
        target, monkeypatch):
    # Slow reference: the dense model's hidden states from transformers itself, and each dense
    # layer run by hand on the pruned model's inputs to that layer.
    import llmprune.engine.driver as driver

    model, tokens = tiny.llama(200, layers=3), ids()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states  # the last has the final norm
    seen, layers_in = [], []
    real = driver.recover_layer

    def watch(layer, hidden, calls, attention_targets, output_targets, *args, **kwargs):
        seen.append(torch.cat(output_targets))
        layers_in.append(torch.cat(list(hidden)))
        return real(layer, hidden, calls, attention_targets, output_targets, *args, **kwargs)

    monkeypatch.setattr(driver, "recover_layer", watch)
    prune(model, PruneConfig("wanda", sparsity=0.5, recover="blockwise", recover_target=target), tokens,
          batch_size=4)
    assert len(seen) == 3
    reference = tiny.llama(200, layers=3)
    reference.load_state_dict(dense)
    _, dense_layers = find_decoder_layers(reference)
    for index in range(2):  # layers 0 and 1: their outputs are hidden states 1 and 2 unnormed
        by_hand = dense_targets(dense_layers[index], [layers_in[index]],
                                capture_layer_calls(reference, dense_layers, [tokens])[1][index], CPU)[1][0]
        assert torch.allclose(seen[index], by_hand if target == "layer" else states[index + 1], atol=1e-5)
    # From layer 1 on the pruned inputs differ from the dense ones, and so do the two targets.
    assert torch.equal(layers_in[0], states[0]) and not torch.allclose(layers_in[1], states[1], atol=1e-3)
    assert (target == "model") == torch.allclose(seen[1], states[2], atol=1e-3)


def test_owl_in_the_loop_gives_each_layer_its_share_and_the_mean_the_target():
    model = tiny.llama(200, layers=4)
    report = prune(model, PruneConfig("wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1), ids(), batch_size=4)
    allocation = report.allocation
    assert allocation is not None and allocation["kind"] == "owl" and allocation["samples"] == 16
    assert sum(allocation["sparsity"]) / 4 == pytest.approx(0.5, abs=1e-12)  # equal-sized layers
    assert max(allocation["sparsity"]) - min(allocation["sparsity"]) == pytest.approx(0.2)
    for (zeros, total), target in zip(report.weight_counts, allocation["sparsity"], strict=True):
        assert zeros / total == pytest.approx(target, abs=1 / 64)  # per-row rounding of 64 columns


def hooked_outlier_ratios(model, tokens):
    """Slow reference for OWL's statistics: the whole model run once on ``tokens``, each linear's
    input norms taken by a hook in float64, the outlier ratio counted weight by weight."""
    squares: dict[tuple[int, str], torch.Tensor] = {}
    _, layers = find_decoder_layers(model)
    handles = []
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            def hook(module, args, key=(index, name)):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                squares[key] = squares.get(key, 0) + (x * x).sum(0)
            handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    expected = []
    for index, layer in enumerate(layers):
        scores = [float(w) * float(n) for name, linear in find_linears(layer).items()
                  for row in get_weight(linear).detach().double().abs()
                  for w, n in zip(row, squares[(index, name)].sqrt(), strict=True)]
        mean = sum(scores) / len(scores)
        expected.append(sum(score > 5 * mean for score in scores) / len(scores))
    return expected


@pytest.mark.parametrize("batch_size", [4, 5, 24])
def test_owl_outlier_ratios_equal_a_plain_forward_with_hooks_on_the_dense_model(batch_size):
    # Whatever the pruning's batch size, the pre-pass reads exactly the first 16 samples (batches
    # of 5 or 24 once made it read 20 or 24: on a GPU, whose automatic batch is larger, other
    # statistics).
    model = tiny.llama(200, layers=3)
    batches = ids(samples=24)
    expected = hooked_outlier_ratios(model, batches[:16])
    report = prune(model, PruneConfig("wanda", sparsity=0.5, allocation="owl"), batches, batch_size=batch_size)
    assert report.allocation is not None and report.allocation["samples"] == 16
    assert report.allocation["outlier_ratio"] == pytest.approx(expected, abs=1e-9)
    assert min(expected) > 0  # the test has outliers to count


def test_owl_reads_norms_gathered_while_the_dense_model_ran_and_makes_no_pass_of_its_own():
    # The norms of tokens the model ran on (here a plain forward standing in for the sampling of
    # generated windows) give the reference's outlier ratios, and layer 0 runs only in the
    # pruning's own passes: twice fewer than with the pre-pass (its capture of the layers' calls,
    # and the pass itself).
    model, copy = tiny.llama(200, layers=3), tiny.llama(200, layers=3)
    batches, other = ids(samples=16), ids(samples=8, seed=1)
    expected = hooked_outlier_ratios(model, other)
    with InputNorms(model) as seen, torch.no_grad():
        model(other)
    assert seen.tokens == 8 * 32 and not any(linear._forward_pre_hooks for linear in find_linears(model).values())
    assert seen.layers is None and not seen.acc  # nothing of the model is kept
    assert all(n.device.type == "cpu" for layer in seen.result for n in layer.values())
    runs = []
    for m in (model, copy):
        calls = [0]
        first = find_decoder_layers(m)[1][0]
        first.register_forward_hook(lambda *args, calls=calls: calls.__setitem__(0, calls[0] + 1))
        runs.append(calls)
    config = PruneConfig("wanda", sparsity=0.5, allocation="owl")
    given = prune(model, config, batches, batch_size=8, owl_norms=seen)
    own = prune(copy, config, batches, batch_size=8)
    assert given.allocation is not None and own.allocation is not None
    assert given.allocation["samples"] == 0 and given.allocation["generated_tokens"] == 8 * 32
    assert given.allocation["outlier_ratio"] == pytest.approx(expected, abs=1e-9)
    assert own.allocation["samples"] == 16 and own.allocation["outlier_ratio"] != given.allocation["outlier_ratio"]
    assert runs[1][0] == runs[0][0] + 2


def test_norms_that_do_not_cover_the_model_and_mixtures_of_experts_get_the_dense_pass():
    small, model = tiny.llama(200, layers=2), tiny.llama(200, layers=3)
    with InputNorms(small) as seen, torch.no_grad():
        small(ids(samples=4))
    report = prune(model, PruneConfig("wanda", sparsity=0.5, allocation="owl"), ids(), batch_size=8, owl_norms=seen)
    assert report.allocation is not None and report.allocation["samples"] == 16
    assert not given_norms_fit(find_decoder_layers(model)[1], InputNorms(model))  # nothing counted
    with InputNorms(model) as seen, torch.no_grad():
        model(ids(samples=4))
    layers = find_decoder_layers(model)[1]
    assert given_norms_fit(layers, seen)
    seen.result[1].pop("mlp.down_proj")  # a linear that never ran
    assert not given_norms_fit(layers, seen)
    with pytest.raises(RuntimeError, match="entered once"), seen:
        pass
    # Hooks go with the block, also when it fails.
    with pytest.raises(ValueError, match="stop"), InputNorms(model):
        raise ValueError("stop")
    assert not any(linear._forward_pre_hooks for linear in find_linears(model).values())
    moe = tiny.mixtral(200)
    assert not plain_layers(find_decoder_layers(moe)[1]) and plain_layers(find_decoder_layers(model)[1])
    with InputNorms(moe) as seen, torch.no_grad():
        moe(ids(samples=4))
    report = prune(moe, PruneConfig("wanda", sparsity=0.5, allocation="owl"), ids(), batch_size=8, owl_norms=seen)
    assert report.allocation is not None and report.allocation["samples"] == 16


def test_a_dense_pass_that_only_observes_gives_the_general_paths_statistics_and_outputs():
    # visit_layer(observe=True) runs each batch once; the general path stops early, then runs
    # the layer again for its outputs. Same numbers, one pass fewer.
    model = tiny.llama(200, layers=2)
    layer, hidden, calls = first_layer_inputs(model, ids())
    linears = find_linears(layer)
    seen: dict[bool, dict[str, dict[str, torch.Tensor]]] = {True: {}, False: {}}
    outputs = {}
    for observe in (False, True):
        def keep(name, stats, into=seen[observe]):
            into[name] = stats.raw()
        outputs[observe] = visit_layer(layer, hidden, calls, linears, {HESSIAN, COLUMN_NORMS}, keep, False,
                                       torch.device("cpu"), observe=observe)
    assert set(seen[True]) == set(seen[False]) == set(linears)
    for name in linears:
        for kind in (HESSIAN, COLUMN_NORMS):
            assert torch.equal(seen[True][name][kind], seen[False][name][kind]), (name, kind)
    assert len(outputs[True]) == len(hidden) == len(outputs[False])
    assert all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False], strict=True))


@pytest.mark.parametrize("build", [tiny.llama, tiny.gpt2, tiny.phi3, *tiny.MOE_ARCHITECTURES.values()],
                         ids=["llama", "gpt2", "phi3", *tiny.MOE_ARCHITECTURES])
def test_the_mlp_stage_regression_reproduces_the_layer_output_token_by_token(build):
    # The cached MLP inputs and the wanted MLP outputs turn the MLP stage into a per-token
    # regression: MLP(input) − wanted must equal the whole layer's output − the target, token by
    # token, for any target and any MLP weights (so the stage's loss is the layer's loss). Mixtures
    # of experts as recovery trains them: unfused, each routed expert a linear of its own.
    model = build(200)
    layer, hidden, calls = first_layer_inputs(model, ids(8, 16))
    targets = [torch.randn(h.shape, generator=torch.Generator().manual_seed(k)) for k, h in enumerate(hidden)]
    with unfused(layer, "routed"):
        rest = [n for n in find_linears(layer) if n.split(".")[0] not in ("self_attn", "attn")]
        _, mlp = mlp_block(layer, rest)
        inputs, wanted = mlp_regression(layer, mlp, hidden, calls, targets, range(2), CPU)
        assert inputs.shape[:2] == (2 * 4 * 16, 1) and wanted.shape == (2 * 4 * 16, tiny.HIDDEN)
        prune_at_random(mlp, 0.5, seed=3)  # other MLP weights than the ones the inputs were read with
        with torch.no_grad():
            out = mlp(inputs)
            out = (out[0] if isinstance(out, tuple) else out).reshape(wanted.shape)
            layer_gap = torch.cat([(calls[k].run(layer, hidden[k], CPU) - targets[k]).reshape(-1, tiny.HIDDEN)
                                   for k in range(2)])
    torch.testing.assert_close(out - wanted, layer_gap, rtol=1e-4, atol=1e-5)


def test_the_regression_runs_the_mlp_once_and_keeps_a_forward_wrapper_of_accelerate():
    # Only the first batch runs the whole MLP (the additivity check; once more token by token);
    # the other batches run the layer with the MLP silenced. accelerate's hooks replace a
    # module's forward by an attribute of its own: it must survive the stand-in.
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = tiny.llama(200)
    layer, hidden, calls = first_layer_inputs(model, ids(12, 16))
    targets = [torch.randn(h.shape, generator=torch.Generator().manual_seed(k)) for k, h in enumerate(hidden)]
    add_hook_to_module(layer.mlp, ModelHook())
    wrapper = layer.mlp.__dict__["forward"]
    runs = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda module, args, output: runs.append(args[0].shape))
    try:
        found = mlp_regression(layer, layer.mlp, hidden, calls, targets, range(3), CPU)
    finally:
        handle.remove()
    assert found is not None and found[0].shape[0] == 3 * 4 * 16
    assert runs == [torch.Size([4, 16, tiny.INTERMEDIATE]), torch.Size([4 * 16, 1, tiny.INTERMEDIATE])]
    assert layer.mlp.__dict__["forward"] is wrapper
    with torch.no_grad():  # and the wrapper still runs the MLP
        state = torch.randn(2, 3, tiny.HIDDEN)
        torch.testing.assert_close(layer.mlp(state), layer.mlp.down_proj(
            layer.mlp.act_fn(layer.mlp.gate_proj(state)) * layer.mlp.up_proj(state)))


class TokenMix(torch.nn.Module):
    """An MLP that mixes each token with the sequence's mean: not token by token."""

    def __init__(self, width):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.ReLU(), torch.nn.Linear(16, width))

    def forward(self, hidden):
        return self.inner(hidden + hidden.mean(dim=-2, keepdim=True))


class ToyLayer(torch.nn.Module):
    """h + MLP(h) (``kind`` "additive"), LayerNorm(h + MLP(h)) ("post-norm": not additive in the
    MLP's output), or h + MLP(h) with an MLP mixing tokens ("mixing")."""

    def __init__(self, kind, width=8):
        super().__init__()
        self.kind = kind
        self.mlp = TokenMix(width) if kind == "mixing" else torch.nn.Sequential(
            torch.nn.Linear(width, 16), torch.nn.ReLU(), torch.nn.Linear(16, width))
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, hidden):
        out = hidden + self.mlp(hidden)
        return self.norm(out) if self.kind == "post-norm" else out


@pytest.mark.parametrize("kind", ["additive", "post-norm", "mixing"])
def test_a_layer_not_additive_in_its_mlp_or_mixing_tokens_trains_the_whole_layer_and_still_recovers(kind):
    torch.manual_seed(0)
    layer = ToyLayer(kind)
    hidden = [torch.randn(4, 6, 8) @ torch.randn(8, 8) for _ in range(4)]
    calls = [LayerCall((), {}, False)] * 4
    with torch.no_grad():
        targets = [layer(h) for h in hidden]
    found = mlp_regression(layer, layer.mlp, hidden, calls, targets, range(3), CPU)
    assert (found is not None) is (kind == "additive")
    prune_at_random(layer)
    zeros = {n: get_weight(m) == 0 for n, m in find_linears(layer).items()}
    result = recover_layer(layer, hidden, calls, None, targets, CPU, RecoverSettings(40, 1e-2, "constant", "last"))
    assert result["mlp_on_tokens"] is (kind == "additive")
    assert result["kept"] and result["error_after"] < 0.8 * result["error_before"], result
    assert all(torch.equal(get_weight(m) == 0, zeros[n]) for n, m in find_linears(layer).items())


def test_an_mlp_whose_output_is_zero_proves_nothing_and_the_whole_layer_trains():
    # Doubling a zero output moves nothing, in a post-norm layer too: not a proof of additivity.
    torch.manual_seed(0)
    layer = ToyLayer("post-norm")
    hidden = [torch.randn(4, 6, 8) for _ in range(2)]
    with torch.no_grad():
        layer.mlp[-1].weight.zero_()
        layer.mlp[-1].bias.zero_()
        targets = [layer(h) for h in hidden]
    assert mlp_regression(layer, layer.mlp, hidden, [LayerCall((), {}, False)] * 2, targets, range(1), CPU) is None


class SometimesLayer(ToyLayer):
    """h + MLP(h), but a batch whose entries reach 50 skips the MLP: the later batches do not call
    it as the first did."""

    def forward(self, hidden):
        return hidden if hidden.abs().max() >= 50 else hidden + self.mlp(hidden)


def test_a_batch_that_does_not_call_the_mlp_stops_the_regression_rather_than_reuse_the_last_input():
    torch.manual_seed(0)
    layer = SometimesLayer("additive")
    hidden = [torch.randn(4, 6, 8), 100 * torch.randn(4, 6, 8)]
    with torch.no_grad():
        targets = [layer(h) for h in hidden]
    assert mlp_regression(layer, layer.mlp, hidden, [LayerCall((), {}, False)] * 2, targets, range(1), CPU) is not None
    assert mlp_regression(layer, layer.mlp, hidden, [LayerCall((), {}, False)] * 2, targets, range(2), CPU) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mlp_steps_draw_tokens_from_every_batch_and_repeat_exactly(dtype):
    # Each batch's tokens carry the batch's number in feature 0, so a step's inputs show which
    # batches they came from: a step mixes batches. Run twice from the same weights, the
    # recovery gives the same weights bit for bit (the order has a fixed seed: resume and
    # streaming train the same way), in the layer's own dtype.
    torch.manual_seed(0)
    layer = ToyLayer("additive").to(dtype)
    hidden = [torch.randn(4, 6, 8).to(dtype) for _ in range(4)]
    for number, state in enumerate(hidden):
        state[..., 0] = number
    calls = [LayerCall((), {}, False)] * 4
    with torch.no_grad():
        targets = [torch.randn(h.shape) for h in hidden]
    prune_at_random(layer)
    pruned = {n: get_weight(m).clone() for n, m in find_linears(layer).items()}
    runs = []
    for _ in range(2):
        with torch.no_grad():
            for name, linear in find_linears(layer).items():
                get_weight(linear).copy_(pruned[name])
        seen: list[torch.Tensor] = []

        def step(module, args, out, seen=seen):
            if torch.is_grad_enabled():
                seen.append(args[0][:, 0, 0].detach().clone())

        handle = layer.mlp.register_forward_hook(step)
        try:
            settings = RecoverSettings(2, 1e-2, "constant", "last")
            result = recover_layer(layer, hidden, calls, None, targets, CPU, settings)
        finally:
            handle.remove()
        assert result["mlp_on_tokens"] and len(seen) == 2 * 2 * 3
        assert all(len(set(batch.tolist())) > 1 for batch in seen)  # every step draws on several batches
        assert set(torch.cat(seen[:6]).tolist()) == {0.0, 1.0, 2.0}  # an epoch covers the 3 training batches
        runs.append({n: get_weight(m).clone() for n, m in find_linears(layer).items()})
    assert all(runs[0][n].dtype == dtype and torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], pruned[n]) for n in pruned)  # it did train (and was kept)


def test_the_mlp_stage_takes_mlp_steps_per_batch_on_tokens_of_every_batch():
    # 16 samples in batches of 4: 3 training batches. With mlp_steps 2 and 3 epochs the MLP is
    # trained in 3 · 2 · 3 = 18 steps of 3 · 4 · 32 / 6 = 64 tokens; with 0, in 3 · 3 steps of
    # the whole layer, one batch each.
    model = correlated(tiny.llama(200, layers=2))
    layer, hidden, calls = first_layer_inputs(model, ids())
    targets = dense_targets(layer, hidden, calls, CPU)
    prune_at_random(layer)
    pruned = {n: get_weight(m).clone() for n, m in find_linears(layer).items()}
    for steps, expected in ((2, 18), (0, 9)):
        with torch.no_grad():
            for name, linear in find_linears(layer).items():
                get_weight(linear).copy_(pruned[name])
        seen: list[torch.Size] = []

        def step(module, args, out, seen=seen):
            if torch.is_grad_enabled():
                seen.append(args[0].shape)

        handle = layer.mlp.register_forward_hook(step)
        try:
            settings = RecoverSettings(3, 1e-3, "constant", "last", steps)
            result = recover_layer(layer, hidden, calls, *targets, CPU, settings)
        finally:
            handle.remove()
        assert result["mlp_on_tokens"] is (steps > 0)
        # the attention stage stops before the MLP: every MLP forward with gradients is a step
        assert len(seen) == expected, seen
        assert all(shape == ((64, 1, tiny.HIDDEN) if steps else (4, 32, tiny.HIDDEN)) for shape in seen), seen
    with pytest.raises(LlmpruneError, match="recover_mlp_steps must be a whole number >= 0"):
        PruneConfig(recover="blockwise", recover_mlp_steps=-1)
    assert PruneConfig().recover_mlp_steps == 2


def test_recovery_trains_conv1d_weights_and_leaves_every_flag_as_it_was():
    # GPT-2's linears are Conv1D, their weight stored (in, out): the parameter itself is trained.
    model = tiny.gpt2(200)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    report = prune(model, PruneConfig("wanda", sparsity=0.5, recover="blockwise", recover_lr=1e-3), ids(),
                   batch_size=4)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(r["error_trained"] != r["error_before"] for r in report.recovery)  # it did train
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_recovery_takes_a_step_per_batch_of_recover_batch_samples_whatever_the_memory():
    # The auto batch of this tiny model holds all 16 samples (one batch: nothing held out, one
    # step an epoch); with recovery on it is capped at recover_batch, and an explicit batch wins.
    model = tiny.llama(200)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    assert prune(model, PruneConfig("wanda", sparsity=0.5), ids()).batch_size == 16
    for config, given, expected in ((PruneConfig("wanda", sparsity=0.5, recover="blockwise"), None, 4),
                                    (PruneConfig("wanda", sparsity=0.5, recover="blockwise", recover_batch=3), None, 3),
                                    (PruneConfig("wanda", sparsity=0.5, recover="blockwise"), 8, 8)):
        model.load_state_dict(dense)
        assert prune(model, config, ids(), batch_size=given).batch_size == expected
    assert PruneConfig().recover_lr == RECOVER_LR and PruneConfig().recover_batch == RECOVER_BATCH == 4
    for bad in (0, 1.5, True):
        with pytest.raises(LlmpruneError, match="recover_batch must be a whole number >= 1"):
            PruneConfig(recover="blockwise", recover_batch=bad)
    assert PruneConfig().recover_schedule == "constant" and PruneConfig().recover_keep == "last"
    with pytest.raises(LlmpruneError, match="recover_schedule must be 'constant' or 'cosine', got 'linear'"):
        PruneConfig(recover="blockwise", recover_schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(LlmpruneError, match="recover_keep must be 'last' or 'best', got 'first'"):
        PruneConfig(recover="blockwise", recover_keep="first")  # type: ignore[arg-type]
    assert PruneConfig().recover_target == "model"
    with pytest.raises(LlmpruneError, match="recover_target must be 'model' or 'layer', got 'dense'"):
        PruneConfig(recover="blockwise", recover_target="dense")  # type: ignore[arg-type]


def pieces_job(model, text, out, **kwargs):
    prune_config = PruneConfig("sparsegpt", sparsity=0.5, allocation="owl", owl_lambda=0.05, refine="dsnot",
                               recover="blockwise", recover_lr=1e-3, schedule=(0.25, 0.5))
    return Job(model=str(model), prune=prune_config, calibration=CalibrationConfig(str(text), 6, 32),
               evaluation=EvalConfig(None), out=str(out), device="cpu", batch_size=2, **kwargs)


def test_streamed_resumed_and_in_memory_runs_write_the_same_tensors_with_every_piece_on(tokenizer, text_file,
                                                                                      tmp_path):
    source = save(tiny.llama(len(tokenizer), layers=4), tokenizer, tmp_path / "src")
    memory = run(pieces_job(source, text_file, tmp_path / "mem", stream="off"))
    streamed = run(pieces_job(source, text_file, tmp_path / "str", stream="on"))
    expected, actual = tensors(tmp_path / "mem"), tensors(tmp_path / "str")
    assert set(expected) == set(actual) and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert streamed["allocation"] == memory["allocation"] and memory["allocation"]["kind"] == "owl"
    assert memory["resolved_options"]["refine"] == "dsnot" and len(memory["recovery"]) == 8  # 2 steps a layer
    progress, cancel = cancel_at("prune", 2)
    with pytest.raises(Cancelled):
        run(pieces_job(source, text_file, tmp_path / "cut", stream="on"), progress=progress, cancel=cancel)
    journal = json.loads((tmp_path / ".cut.partial" / ".llmprune-journal" / "journal.json").read_text())
    assert len(journal["layers"]) == 2
    resumed = run(pieces_job(source, text_file, tmp_path / "cut", stream="on", resume=True))
    assert resumed["streaming"]["resumed_at_layer"] == 2
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "str")
    def errors(record):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in record["recovery"]]

    assert errors(resumed) == errors(streamed)  # the journaled layers' too


def test_every_piece_from_the_command_line_lands_in_the_record_and_the_card(llama_dir, text_file, tmp_path,
                                                                           capsys):
    from llmprune.cli.commands import main

    out, record_path = tmp_path / "out", tmp_path / "record.json"
    argv = ["--model", str(llama_dir), "--method", "wanda", "--update", "admm", "--refine", "dsnot",
            "--allocation", "owl", "--recover", "blockwise", "--schedule", "0.25,0.5", "--sparsity", "0.5",
            "--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--threads", "1", "--quiet",
            "--calib", str(text_file), "--eval", "none", "--out", str(out), "--json", str(record_path)]
    assert main(argv) == 0
    record = json.loads(record_path.read_text())
    options = record["resolved_options"]
    assert (options["update"], options["refine"], options["allocation"]) == ("admm", "dsnot", "owl")
    assert record["config"]["recover"] == "blockwise" and record["config"]["schedule"] == [0.25, 0.5]
    first_layer = record["allocation"]["sparsity"][0]  # the schedule scaled to the layer's own target
    steps = [r["step_sparsity"] for r in record["recovery"] if r["layer"] == 0]
    assert steps == pytest.approx([first_layer / 2, first_layer])
    card = (out / "README.md").read_text()
    assert "mask refinement: dsnot" in card and "layer sparsity: OWL" in card and "schedule: 0.25, 0.5" in card
    assert ("block-wise recovery: 2 epochs at lr 0.003 in batches of 2 samples toward the dense model's own "
            "activations") in card
    capsys.readouterr()
    assert main([*argv[:-4], "--pattern", "2:4", "--allocation", "uniform"]) == 2
    assert "pattern 2:4 has one step only" in capsys.readouterr().err


def test_the_card_says_which_recovery_options_ran():
    from llmprune.jobs.card import pieces_line
    config = {"recover_epochs": 2, "recover_lr": 0.003, "recover_schedule": "cosine", "recover_keep": "best",
              "recover_target": "model"}
    record = {"config": config, "resolved_options": {}, "calibration": {"batch_size": 4},
              "recovery": [{"kept": True}, {"kept": False}]}
    assert ("block-wise recovery: 2 epochs at lr 0.003 down a cosine to 0 in batches of 4 samples, each stage's "
            "best epoch by the held-out error toward the dense model's own activations, kept in 1 of 2 layer "
            "steps") in pieces_line(record)
    for key in ("recover_schedule", "recover_keep", "recover_target"):  # a record from before the options
        del record["config"][key]
    assert ("block-wise recovery: 2 epochs at lr 0.003 in batches of 4 samples toward the dense layer on the "
            "pruned inputs, kept in 1 of 2") in pieces_line(record)
    record["config"]["recover_mlp_steps"] = 2
    record["recovery"] = [{"kept": True, "mlp_on_tokens": True}, {"kept": True, "mlp_on_tokens": False}]
    assert ("toward the dense layer on the pruned inputs, the MLP alone on tokens shuffled across the batches "
            "(2 steps per calibration batch) in 1 of 2 layer steps, kept in 2 of 2 layer steps") in pieces_line(record)
