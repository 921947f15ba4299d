"""Structured pruning: the OBS solver's known answers, shapes and configs of the smaller model,
stock save/load, GQA constraints, identity at zero, bad inputs."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from llmprune.core.factor import damped_inverse
from llmprune.engine.capture import capture_layer_calls
from llmprune.errors import LlmpruneError
from llmprune.structured.obs import greedy_remove, greedy_remove_columns, group_errors
from llmprune.structured.run import StructuredConfig, prune_structured

ARCHS = ["llama", "mistral", "qwen2", "gemma3", "phi3"]
SEQLEN = 24


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


# --- the solver -----------------------------------------------------------------------------


def test_identity_hessian_removal_is_slicing():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=gen)
    result = greedy_remove(W, torch.eye(8), [[0, 1], [2, 3], [4, 5], [6, 7]], 2, damp=1e-9)
    kept = [c for g in range(4) if g not in result.removed for c in (2 * g, 2 * g + 1)]
    gone = [c for g in result.removed for c in (2 * g, 2 * g + 1)]
    assert torch.allclose(result.weight[:, kept], W[:, kept], atol=1e-6)
    assert (result.weight[:, gone] == 0).all()
    # With H = I the cheapest groups are those of least Frobenius norm.
    norms = torch.stack([W[:, 2 * g : 2 * g + 2].square().sum() for g in range(4)])
    assert sorted(result.removed) == sorted(norms.argsort()[:2].tolist())


def test_a_removed_column_made_of_kept_ones_is_reconstructed_exactly():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    X[:, 5] = X[:, 0] + 2 * X[:, 3]
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    W[:, 5] *= 10  # so plain slicing would be a large error
    H = hessian_of(X)
    # Force the choice: only column 5 is offered.
    result = greedy_remove(W, H, [[5]], 1, damp=1e-10)
    assert (result.weight[:, 5] == 0).all()
    assert torch.allclose(X @ result.weight.T, X @ W.T, atol=1e-5)
    assert result.errors[0] == pytest.approx(0.0, abs=1e-5)


def test_obs_error_equals_the_loss_increase():
    """E(S) = tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ) equals tr(ΔW H ΔWᵀ) = 2‖ΔW X‖²/n after the optimal update."""
    gen = torch.Generator().manual_seed(2)
    mix = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    X = torch.randn(300, 10, generator=gen, dtype=torch.float64) @ mix
    W = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    H = hessian_of(X)
    result = greedy_remove(W, H, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], 1, damp=1e-12)
    delta = result.weight - W
    loss = torch.trace(delta @ H @ delta.T).item()
    assert result.errors[0] == pytest.approx(loss, rel=1e-6)
    # and the greedy first pick is the cheapest group by brute force
    Hinv, _ = damped_inverse(H, 1e-12)
    errs = group_errors(W, Hinv, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])
    assert result.removed[0] == int(errs.argmin())


def test_partition_takes_the_same_number_from_each_part():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(4, 12, generator=gen)
    H = hessian_of(torch.randn(200, 12, generator=gen))
    groups = [[2 * g, 2 * g + 1] for g in range(6)]
    result = greedy_remove(W, H, groups, 2, partition=[[0, 1, 2], [3, 4, 5]])
    assert sum(g < 3 for g in result.removed) == 1 and sum(g >= 3 for g in result.removed) == 1
    with pytest.raises(LlmpruneError, match="evenly"):
        greedy_remove(W, H, groups, 3, partition=[[0, 1, 2], [3, 4, 5]])


def test_batched_column_greedy_matches_one_at_a_time_in_its_limit():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(400, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    W = torch.randn(5, 16, generator=gen)
    H = hessian_of(X)
    single = greedy_remove_columns(W, H, 6, steps=6)
    groups = greedy_remove(W, H, [[j] for j in range(16)], 6)
    assert single.removed == groups.removed
    assert torch.allclose(single.weight, groups.weight, atol=1e-5)
    batched = greedy_remove_columns(W, H, 6, steps=2)
    assert len(set(batched.removed)) == 6 and (batched.weight[:, batched.removed] == 0).all()


# --- whole models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return {arch: tiny.ARCHITECTURES[arch]() for arch in ARCHS}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = [
    ("heads", dict(sparsity=0.5), "obs"),
    ("heads", dict(sparsity=0.5, kv="groups"), "obs"),
    ("channels", dict(sparsity=0.25), "obs"),
    ("structured", dict(params=0.3), "obs"),
    ("channels", dict(sparsity=0.25), "magnitude"),
    ("heads", dict(sparsity=0.5), "wanda-sp"),
    ("channels", dict(sparsity=0.25), "flap"),
    ("heads", dict(sparsity=0.5), "flap"),
    ("channels", dict(sparsity=0.25), "taylor"),
    ("layers", dict(sparsity=0.5), "obs"),
    ("structured", dict(params=0.6, drop_layers=1), "obs"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pattern,kwargs,score", CASES, ids=[f"{p}-{s}-{i}" for i, (p, _, s) in enumerate(CASES)])
def test_smaller_model_is_consistent_and_loads_stock(models, arch, pattern, kwargs, score, tmp_path):
    dense = copy.deepcopy(models[arch])
    cfg = dense.config
    ids = tiny.random_ids(4, SEQLEN, seed=5)
    probe = tiny.random_ids(2, SEQLEN, seed=6)
    config = StructuredConfig(pattern=pattern, score=score, **kwargs)
    pruned, report = prune_structured(dense, config, ids, device="cpu")
    new = pruned.config
    if pattern == "layers" or kwargs.get("drop_layers"):  # the dense model with those layers taken out by hand
        dense.model.layers = torch.nn.ModuleList([dense.model.layers[i] for i in report.plan.layers])
    # Masked in-memory model (zeroed columns) and the physically smaller one agree.
    assert torch.allclose(logits(dense, probe), logits(pruned, probe), atol=1e-4)
    assert report.params_after < report.params_before
    assert new.num_attention_heads % new.num_key_value_heads == 0
    assert new.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if pattern == "heads":
        if kwargs.get("kv") == "groups":
            assert (new.num_key_value_heads, new.num_attention_heads) == (1, 2)
        else:
            assert (new.num_key_value_heads, new.num_attention_heads) == (2, 2)
    if pattern == "channels":
        assert new.intermediate_size == 96
    if pattern == "layers":
        assert new.num_hidden_layers == 1
        if hasattr(new, "layer_types"):
            assert len(new.layer_types) == 1
    if kwargs.get("drop_layers"):
        assert new.num_hidden_layers == cfg.num_hidden_layers - 1
        assert len(getattr(new, "layer_types", None) or [None] * new.num_hidden_layers) == new.num_hidden_layers
        assert abs(report.layer_params_removed - kwargs["params"]) < 0.02
    fresh = AutoModelForCausalLM.from_config(new)  # what stock code builds from the rewritten config
    assert {n: p.shape for n, p in pruned.named_parameters()} == {n: p.shape for n, p in fresh.named_parameters()}
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(pruned)
    assert torch.equal(logits(loaded, probe), logits(pruned, probe))


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_nothing_is_the_identity(models, arch):
    dense = copy.deepcopy(models[arch])
    probe = tiny.random_ids(2, SEQLEN, seed=6)
    expected = logits(models[arch], probe)
    for pattern, kwargs in (("heads", dict(sparsity=0.0)), ("channels", dict(sparsity=0.0)),
                            ("structured", dict(params=0.0)), ("layers", dict(sparsity=0.0))):
        pruned, report = prune_structured(copy.deepcopy(dense), StructuredConfig(pattern=pattern, **kwargs),
                                          tiny.random_ids(3, SEQLEN, seed=5), device="cpu")
        assert report.params_after == report.params_before, pattern
        assert torch.allclose(logits(pruned, probe), expected, atol=1e-5), pattern


def test_dropping_a_layer_that_adds_nothing_is_lossless():
    """A layer whose o_proj and down_proj are zero leaves the residual stream as it is: its block
    influence is 0, so it is the layer dropped, and at params = 1/3 of 3 layers no width is left
    to remove, so the smaller model computes what the dense one does."""
    dense = tiny.llama(layers=3, seed=3)
    for proj in (dense.model.layers[1].self_attn.o_proj, dense.model.layers[1].mlp.down_proj):
        proj.weight.data.zero_()
    probe = tiny.random_ids(2, SEQLEN, seed=6)
    expected = logits(dense, probe)
    config = StructuredConfig("structured", params=1 / 3, drop_layers=1)
    pruned, report = prune_structured(copy.deepcopy(dense), config, tiny.random_ids(4, SEQLEN, seed=5), device="cpu")
    assert report.plan.layers == [0, 2]
    dropped = [e for e in report.errors if e.get("removed")]
    assert [e["layer"] for e in dropped] == [1] and dropped[0]["block_influence"] == pytest.approx(0, abs=1e-6)
    assert (pruned.config.num_attention_heads, pruned.config.intermediate_size) == (tiny.HEADS, tiny.INTERMEDIATE)
    assert torch.allclose(logits(pruned, probe), expected, atol=1e-5)


def test_width_share_makes_up_the_rest_of_params():
    from llmprune.structured.run import width_share

    # SmolLM2's 30 layers: dropping 7 leaves 7.5 - 7 layers' worth to take from the 23 kept.
    assert width_share(StructuredConfig("structured", params=0.25, drop_layers=7), 30) == pytest.approx(0.5 / 23)
    assert width_share(StructuredConfig("structured", params=0.25), 30) == 0.25
    assert width_share(StructuredConfig("structured", params=0.5, drop_layers=1), 2) == 0.0
    assert width_share(StructuredConfig("structured", params=0.2333, drop_layers=7), 30) == 0.0  # 7/30 as typed
    assert width_share(StructuredConfig("structured", params=0.1), 30) == 0.1  # exactly, not 0.1 * 30 / 30


def two_layer_setup(model):
    """A tiny model's layers, their captured inputs and calls, and layer 0's outputs."""
    layers, cpu = model.model.layers, torch.device("cpu")
    hidden, calls = capture_layer_calls(model, layers, list(tiny.random_ids(4, SEQLEN, seed=5).split(2)))
    with torch.no_grad():
        before = [c.run(layers[0], h, cpu) for h, c in zip(hidden, calls[0], strict=True)]
    return layers, hidden, calls, before


def test_a_bridge_that_does_not_fit_the_architecture_is_put_back():
    """Gemma 3 normalises the MLP output before the residual add, so the linear fit is only a
    guess there: whatever it gives, the layer's outputs never end up further from the dropped
    run's than without it, and the share reported is the one measured."""
    from llmprune.structured.bridge import bridge

    layers, hidden, calls, before = two_layer_setup(tiny.gemma3())
    cpu, down = torch.device("cpu"), layers[0].mlp.down_proj
    with torch.no_grad():
        target = [c.run(layers[1], b, cpu) for b, c in zip(before, calls[1], strict=True)]
    W = down.weight.detach().clone()
    keep = list(range(tiny.INTERMEDIATE))
    outputs, explained = bridge(layers[0], down, hidden, before, calls[0], [(layers[1], calls[1])], keep, 0.01, cpu)
    old = sum(float((t - b).square().sum()) for t, b in zip(target, before, strict=True))
    new = sum(float((t - o).square().sum()) for t, o in zip(target, outputs, strict=True))
    # The share is measured on the held-out batch; a fit it does not help is put back whole.
    if explained == 0:
        assert torch.equal(down.weight, W) and all(torch.equal(o, b) for o, b in zip(outputs, before, strict=True))
    else:
        assert 0 < explained < 1 and new < old and not torch.equal(down.weight, W)


def test_a_refit_that_makes_the_outputs_worse_is_put_back(monkeypatch):
    """The put-back branch itself: a fit that moves the outputs away from the dropped run's
    (forced here by a harmful refit) leaves the weight, the outputs and the share at 'nothing'."""
    import llmprune.structured.bridge as bridging

    layers, hidden, calls, before = two_layer_setup(tiny.llama())
    cpu, down = torch.device("cpu"), layers[0].mlp.down_proj
    W = down.weight.detach().clone()
    fitted = bridging.fit_bridge
    monkeypatch.setattr(bridging, "fit_bridge", lambda G, C, keep, damp: -50 * fitted(G, C, keep, damp))
    keep = list(range(tiny.INTERMEDIATE))
    outputs, explained = bridging.bridge(layers[0], down, hidden, before, calls[0], [(layers[1], calls[1])], keep,
                                         0.01, cpu)
    assert explained == 0
    assert torch.equal(down.weight, W)
    assert all(torch.equal(o, b) for o, b in zip(outputs, before, strict=True))


# --- bridging dropped layers ------------------------------------------------------------------


def test_fit_bridge_recovers_a_linear_map_on_the_kept_channels():
    from llmprune.structured.bridge import fit_bridge

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    M = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    keep = [0, 2, 3, 5]
    M[:, [1, 4]] = 0  # the dropped run reads only kept channels: a linear map can carry all of it
    delta = A @ M.T
    D = fit_bridge(A.T @ A, delta.T @ A, keep, damp=1e-10)
    assert torch.allclose(D, M, atol=1e-6)
    assert (delta - A @ D.T).square().sum() < 1e-12 * delta.square().sum()  # the whole map is carried
    D = fit_bridge(A.T @ A, torch.zeros(4, 6, dtype=torch.float64), keep, damp=0.01)
    assert D.abs().max() == 0  # nothing was added: nothing changes


def test_bridge_matches_a_naive_ridge_fit_and_explains_what_it_says():
    from llmprune.engine.capture import capture_layer_calls
    from llmprune.structured.bridge import bridge

    model = tiny.llama(layers=3, seed=4)
    layers, cpu = model.model.layers, torch.device("cpu")
    # 4 batches of 16 x 24 tokens: 1152 tokens to fit 16 kept channels, 384 held out. (A random
    # tiny model's dropped layers are mostly not linear in the kept channels: fewer tokens or
    # more channels and the fit does not carry over to the held-out batch, which is the point.)
    hidden, calls = capture_layer_calls(model, layers, list(tiny.random_ids(64, SEQLEN, seed=5).split(16)))
    down = layers[0].mlp.down_proj
    seen = []
    hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        before = [c.run(layers[0], h, cpu) for h, c in zip(hidden, calls[0], strict=True)]
        hook.remove()
        target = [c.run(layers[2], c1.run(layers[1], b, cpu), cpu)
                  for b, c1, c in zip(before, calls[1], calls[2], strict=True)]
    # Slow reference: every token's down_proj input, ridge solution on the kept channels.
    keep = list(range(0, tiny.INTERMEDIATE, 8))
    A = torch.cat(seen).double()[:, keep]
    delta = torch.cat([(t - b).reshape(-1, t.shape[-1]) for t, b in zip(target, before, strict=True)]).double()
    G = A.T @ A
    expected = torch.linalg.solve(G + 0.01 * G.diagonal().mean() * torch.eye(len(keep), dtype=G.dtype),
                                  A.T @ delta).T
    W = down.weight.detach().clone()
    outputs, explained = bridge(layers[0], down, hidden, before, calls[0],
                                [(layers[1], calls[1]), (layers[2], calls[2])], keep, 0.01, cpu)
    change = (down.weight.detach() - W).double()
    assert torch.allclose(change[:, keep], expected, rtol=1e-3, atol=1e-4)  # float32 sums
    assert change[:, [j for j in range(tiny.INTERMEDIATE) if j % 8]].abs().max() == 0
    old = sum(float((t - b).square().sum()) for t, b in zip(target, before, strict=True))
    new = sum(float((t - o).square().sum()) for t, o in zip(target, outputs, strict=True))
    assert new < old
    # The share it reports is measured on the last batch, held out of a fit on the others: not
    # on the tokens the kept fit saw (which would flatter it).
    rows = sum(x.shape[0] for x in seen[:-1])
    A_fit, delta_fit, A_held, delta_held = A[:rows], delta[:rows], A[rows:], delta[rows:]
    G_fit = A_fit.T @ A_fit
    D_fit = torch.linalg.solve(G_fit + 0.01 * G_fit.diagonal().mean() * torch.eye(len(keep), dtype=G.dtype),
                               A_fit.T @ delta_fit).T
    held_out = 1 - float((delta_held - A_held @ D_fit.T).square().sum()) / float(delta_held.square().sum())
    assert held_out > 0  # the set-up: a fit that carries over, so the bridge is kept
    assert explained == pytest.approx(held_out, rel=1e-3)
    in_sample = 1 - new / old
    assert explained < in_sample  # the in-sample share overstates what the bridge carries


def test_structured_depth_bridges_each_dropped_run():
    dense = tiny.llama(layers=4, seed=2)
    ids = tiny.random_ids(4, SEQLEN, seed=5)
    _, report = prune_structured(copy.deepcopy(dense), StructuredConfig("structured", params=0.5, drop_layers=2),
                                 ids, device="cpu")
    dropped = sorted(e["layer"] for e in report.errors if e.get("removed"))
    bridged = [j for e in report.errors for j in e.get("bridged_layers", [])]
    # Every dropped layer with a kept one somewhere before it is bridged (leading ones cannot be).
    assert sorted(bridged) == [j for j in dropped if any(i not in dropped for i in range(j))]
    assert all(0 <= e["bridge_explained"] <= 1 for e in report.errors if "bridged_layers" in e)
    _, plain = prune_structured(copy.deepcopy(dense), StructuredConfig("structured", params=0.5, drop_layers=2,
                                                                       bridge=False), ids, device="cpu")
    assert not any("bridged_layers" in e for e in plain.errors)


def test_flap_compensates_with_a_bias_llama_can_take(models):
    dense = copy.deepcopy(models["llama"])
    pruned, report = prune_structured(dense, StructuredConfig(pattern="channels", sparsity=0.5, score="flap"),
                                      tiny.random_ids(4, SEQLEN, seed=5), device="cpu")
    assert report.bias_compensation
    assert pruned.config.mlp_bias and pruned.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


def test_obs_beats_one_shot_scores_on_the_layer_loss(models):
    """On calibration data the OBS choice and update leave the smallest output change."""
    ids = tiny.random_ids(6, SEQLEN, seed=7)
    reference = logits(models["llama"], ids)
    errors = {}
    for score in ("obs", "magnitude", "wanda-sp"):
        pruned, _ = prune_structured(copy.deepcopy(models["llama"]),
                                     StructuredConfig(pattern="channels", sparsity=0.5, score=score), ids, device="cpu")
        errors[score] = (logits(pruned, ids) - reference).square().mean().item()
    assert errors["obs"] < errors["magnitude"] and errors["obs"] < errors["wanda-sp"]


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(pattern="heads", sparsity=0.9), "would leave no heads"),
    (dict(pattern="heads", sparsity=0.9, kv="groups"), "would leave no heads"),
    (dict(pattern="layers", sparsity=0.99), "would leave none"),
    (dict(pattern="structured", params=0.5, drop_layers=2), "would leave none"),
    (dict(pattern="structured", params=0.3, drop_layers=1), "more than params 30%"),
])
def test_removing_everything_is_refused(models, kwargs, message):
    with pytest.raises(LlmpruneError, match=message):
        prune_structured(copy.deepcopy(models["llama"]), StructuredConfig(**kwargs), tiny.random_ids(2, SEQLEN),
                         device="cpu")


@pytest.mark.parametrize("kwargs,message", [
    (dict(pattern="heads"), "needs sparsity"),
    (dict(pattern="structured", sparsity=0.2), "needs params"),
    (dict(pattern="channels", sparsity=1.0), r"in \[0, 1\)"),
    (dict(pattern="rows", sparsity=0.2), "unknown structure"),
    (dict(pattern="heads", sparsity=0.2, score="sparsegpt"), "unknown structured score"),
    (dict(pattern="heads", sparsity=0.2, drop_layers=1), "applies to pattern structured"),
    (dict(pattern="structured", params=0.2, drop_layers=-1), "whole number"),
])
def test_bad_structured_configs(kwargs, message):
    with pytest.raises(LlmpruneError, match=message):
        StructuredConfig(**kwargs)


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_architectures_without_recognisable_projections_fail_clearly(arch):
    model = tiny.ARCHITECTURES[arch]()
    with pytest.raises(LlmpruneError, match=r"cannot find the|intermediate_size"):
        prune_structured(model, StructuredConfig(pattern="channels", sparsity=0.25), tiny.random_ids(2, SEQLEN),
                         device="cpu")


@pytest.mark.parametrize("params", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("kv", ["query", "groups"])
def test_structured_removes_the_requested_share_of_parameters(models, params, kv):
    """Heads and channels together land within one channel of the target (each channel is
    3 x hidden parameters of a layer), whatever split the solver picks."""
    dense = copy.deepcopy(models["llama"])
    _, report = prune_structured(dense, StructuredConfig("structured", params=params, kv=kv),
                                 tiny.random_ids(4, SEQLEN, seed=5), device="cpu")
    per_layer = report.layer_params_before / report.layers_before
    assert abs(report.layer_params_removed - params) <= 3 * tiny.HIDDEN / per_layer + 1e-9


def test_feasible_counts_round_half_up():
    from llmprune.structured.anatomy import Widths
    from llmprune.structured.run import head_count

    widths = Widths(heads=16, kv_heads=8, head_dim=8, intermediate=64, hidden=128)  # 2 query heads per group
    assert head_count(widths, 0.25, "query") == 1  # 0.5 rounds up: one head of every group
    assert head_count(widths, 0.2, "query") == 0
    assert head_count(widths, 0.25, "groups") == 2


def test_structured_obs_zeroes_dead_columns_and_damps_by_the_live_inputs():
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(300, 8, generator=gen, dtype=torch.float64) * 5
    X[:, [2, 6]] = 0  # two inputs never fire
    H = X.T @ X / 300
    Hinv, _ = damped_inverse(H, 0.01)
    damped = H.clone()
    damped.diagonal()[[2, 6]] = 1.0
    damped += torch.eye(8, dtype=torch.float64) * 0.01 * H.diagonal()[[0, 1, 3, 4, 5, 7]].mean()
    assert torch.allclose(Hinv, torch.linalg.inv(damped))
    W = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    for removal in (greedy_remove(W, H, [[0, 1], [4, 5]], 1), greedy_remove_columns(W, H, 2)):
        assert (removal.weight[:, [2, 6]] == 0).all()


def test_the_smaller_model_is_built_without_a_second_full_model():
    """shrink gives the new model the sliced tensors themselves (built on the meta device): the
    unsliced ones are the old model's own, nothing is left on the meta device, ties hold."""
    model = tiny.gemma3()  # ties its head to the embeddings
    embeddings = model.model.embed_tokens.weight.data_ptr()
    smaller, _ = prune_structured(model, StructuredConfig("heads", sparsity=0.5), tiny.random_ids(4, SEQLEN),
                                  device="cpu")
    tensors = [*smaller.named_parameters(), *smaller.named_buffers()]
    assert [n for n, t in tensors if t.device.type == "meta"] == []
    assert smaller.model.embed_tokens.weight.data_ptr() == embeddings  # shared, not copied
    assert smaller.lm_head.weight.data_ptr() == embeddings
    assert all(p.requires_grad for p in smaller.parameters())
