"""The generic driver on tiny random models of seven families: the layer-by-layer replay equals
the model's own forward, pruning meets its sparsity contract, checkpoints load in stock
transformers, and batching does not change the result."""

from __future__ import annotations

import copy
import json
import math

import pytest
import tiny
import torch
from torch import nn

from llmprune.engine.capture import capture_layer_calls
from llmprune.engine.config import PruneConfig
from llmprune.engine.driver import prune
from llmprune.engine.model import find_decoder_layers
from llmprune.errors import LlmpruneError

ARCHS = list(tiny.ARCHITECTURES)
METHODS = ["magnitude", "wanda", "ria", "sparsegpt"]
CPU = torch.device("cpu")
SEQLEN = 40  # longer than Gemma 3's sliding window of 16


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One pristine model per architecture; tests prune deep copies."""
    return {name: build() for name, build in tiny.ARCHITECTURES.items()}


def fresh(models: dict[str, nn.Module], arch: str) -> nn.Module:
    return copy.deepcopy(models[arch])


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@torch.no_grad()
def last_layer_output(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states leaving the last decoder layer in an ordinary forward of the model."""
    seen = []

    def hook(module, args, output):
        seen.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = layers[-1].register_forward_hook(hook)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@torch.no_grad()
def replay(layers, hidden, calls, substitute=None) -> torch.Tensor:
    """Push every captured batch through all decoder layers one by one. ``substitute`` maps a
    layer index to another layer whose captured arguments it should use instead."""
    outputs = []
    for batch, state in enumerate(hidden):
        for index, layer in enumerate(layers):
            source = (substitute or {}).get(index, index)
            state = calls[source][batch].run(layer, state, CPU)
        outputs.append(state)
    return torch.cat(outputs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= tol * max(scale, 1.0), f"max difference {diff:.3g} (scale {scale:.3g})"


# --- replay --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_replay_reproduces_forward(models, arch):
    model = models[arch]
    _, layers = find_decoder_layers(model)
    ids = tiny.random_ids(3, SEQLEN, seed=1)
    # Uneven batches (2 + 1): every batch must keep its own captured arguments.
    hidden, calls = capture_layer_calls(model, layers, list(ids.split(2)))
    assert [h.shape[0] for h in hidden] == [2, 1]
    assert all(len(per_layer) == 2 for per_layer in calls)
    replayed = replay(layers, hidden, calls)
    # The reference forward runs after the capture, so it also shows the capture left the
    # layers' own forward in place.
    expected = last_layer_output(model, layers, ids)
    assert replayed.shape == expected.shape
    assert_close(replayed, expected, 1e-5)


def test_gemma3_replay_needs_each_layers_own_mask(models):
    """Guards the replay test's power: Gemma 3's sliding and full layers get different masks,
    so replaying a sliding layer with the full layer's arguments must change the result."""
    model = models["gemma3"]
    _, layers = find_decoder_layers(model)
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    hidden, calls = capture_layer_calls(model, layers, [tiny.random_ids(2, SEQLEN, seed=2)])
    right = replay(layers, hidden, calls)
    wrong = replay(layers, hidden, calls, substitute={0: 1, 2: 1})
    assert (right - wrong).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_changes_nothing(models, arch, method):
    ids = tiny.random_ids(3, SEQLEN, seed=3)
    probe = tiny.random_ids(2, SEQLEN, seed=4)
    reference = models[arch]
    expected_logits = logits(reference, probe)
    expected_weights = snapshot(reference)
    for sequential in (False, True):
        for batch_size in (1, None):  # one sample per forward, and everything in one batch
            model = fresh(models, arch)
            report = prune(model, PruneConfig(method=method, sparsity=0.0, sequential=sequential), ids,
                           device="cpu", batch_size=batch_size)
            where = f"sequential={sequential} batch_size={batch_size}"
            assert report.batch_size == (batch_size or len(ids)), where
            for name, param in model.named_parameters():
                # SparseGPT runs its OBS solve even with nothing to prune; it must be a no-op.
                assert_close(param.detach(), expected_weights[name], 1e-5 if method == "sparsegpt" else 0.0)
            assert_close(logits(model, probe), expected_logits, 1e-5)
            assert all(item.sparsity == 0.0 for item in report.linears), where


# --- the contract at 50% -------------------------------------------------------------------


def expected_zeros(method: str, pattern: str, shape: tuple[int, int]) -> int:
    rows, cols = shape
    if pattern != "unstructured":
        n, m = (int(v) for v in pattern.split(":"))
        return rows * cols * (m - n) // m
    if method in ("wanda", "ria"):  # Wanda and RIA compare within each row
        return rows * math.floor(cols * 0.5)
    return math.floor(rows * cols * 0.5)  # magnitude and SparseGPT compare the whole matrix


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_pruning_contract(models, arch, method, pattern):
    model = fresh(models, arch)
    layers_path = tiny.LAYERS_PATH[arch]
    linears = tiny.decoder_linears(model, layers_path)
    before = snapshot(model)
    sparsity = 0.5 if pattern == "unstructured" else None
    report = prune(model, PruneConfig(method=method, pattern=pattern, sparsity=sparsity),
                   tiny.random_ids(4, SEQLEN, seed=5), device="cpu")

    assert report.layers_path == layers_path
    reported = {item.name: item for item in report.linears}
    assert len(reported) == len(report.linears), "a linear is reported twice"
    assert set(reported) == set(linears)

    for name, linear in linears.items():
        W = tiny.weight_out_in(linear).detach()
        rows, cols = W.shape
        zeros = int((W == 0).sum())
        assert reported[name].shape == (rows, cols), name
        assert reported[name].sparsity == pytest.approx(zeros / W.numel(), abs=1e-12), name
        assert zeros == expected_zeros(method, pattern, (rows, cols)), name
        if pattern == "unstructured" and method in ("wanda", "ria"):
            per_row = (W == 0).sum(1)
            assert torch.all(per_row == math.floor(cols * 0.5)), name
        if pattern != "unstructured":
            n, m = (int(v) for v in pattern.split(":"))
            nonzeros = (W != 0).reshape(rows, cols // m, m).sum(-1)
            assert int(nonzeros.max()) <= n, name

    pruned = {f"{name}.weight" for name in linears}
    for name, param in model.named_parameters():
        if name not in pruned:  # embeddings, norms, lm_head, biases, positions
            assert torch.equal(param.detach(), before[name]), f"{name} changed"
    assert torch.isfinite(logits(model, tiny.random_ids(2, SEQLEN, seed=6))).all()
    assert report.sparsity == pytest.approx(0.5, abs=0.01)


# --- layer discovery -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_layers(models, arch):
    model = models[arch]
    path, layers = find_decoder_layers(model)
    assert path == tiny.LAYERS_PATH[arch]
    assert layers is model.get_submodule(path)


class NoDecoder(nn.Module):
    """An embedding, a stack of norms (a ModuleList without linears) and an output linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(tiny.VOCAB, 16)
        self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(3))
        self.head = nn.Linear(16, tiny.VOCAB)

    def forward(self, input_ids, **kwargs):
        state = self.embed(input_ids)
        for norm in self.norms:
            state = norm(state)
        return self.head(state)


def test_model_without_decoder_layers_is_refused():
    model = NoDecoder()
    with pytest.raises(LlmpruneError, match="decoder"):
        find_decoder_layers(model)
    before = snapshot(model)
    with pytest.raises(LlmpruneError, match="decoder"):
        prune(model, PruneConfig(method="wanda"), tiny.random_ids(2, 8), device="cpu")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- save and load -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_checkpoint_loads_in_stock_transformers(models, tokenizer, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from llmprune.io.export import save_checkpoint
    from llmprune.jobs.card import model_card
    from llmprune.jobs.pipeline import Job
    from llmprune.jobs.record import build_record

    model = fresh(models, arch)
    config = PruneConfig(method="sparsegpt", pattern="2:4")
    calibration = tiny.random_ids(4, SEQLEN, seed=7)
    report = prune(model, config, calibration, device="cpu")
    record = build_record(Job(model=f"tiny-{arch}", prune=config), model, report, calibration, None, None,
                          {"prune_s": report.seconds}, CPU, ["llmprune", "--model", f"tiny-{arch}"])
    # A sparsity_config in config.json makes vLLM refuse the checkpoint; the export must drop
    # one even if something upstream put it on the config.
    model.config.sparsity_config = {"format": "sparse-bitmask"}
    out = save_checkpoint(model, tokenizer, tmp_path / "out", record, model_card(record))

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    probe = tiny.random_ids(2, SEQLEN, seed=8)
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    assert "sparsity_config" not in json.loads((out / "config.json").read_text())
    assert any(p.suffix == ".safetensors" for p in out.iterdir())

    saved = json.loads((out / "llmprune.json").read_text())
    assert saved["method"] == "sparsegpt"
    assert saved["pattern"] == "2:4"
    names = sorted(tiny.decoder_linears(model, tiny.LAYERS_PATH[arch]))
    assert sorted(item["name"] for item in saved["layers"]) == names
    assert all(item["sparsity"] == pytest.approx(0.5) for item in saved["layers"])
    card = (out / "README.md").read_text()
    assert "sparsegpt" in card and "2:4" in card
    assert all(f"| {name} |" in card for name in names)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


# --- batching and true-sequential ----------------------------------------------------------


def pruned_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tiny.weight_out_in(lin).detach().clone()
            for name, lin in tiny.decoder_linears(model, "model.layers").items()}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_batching_and_path_do_not_change_the_result(models, method, sequential, monkeypatch):
    """Statistics are counted in tokens, so splitting the calibration set into batches (of one,
    or uneven ones: 2 + 2 + 1, which a mean of per-batch means would get wrong) must give the
    weights one batch gives. True-sequential runs also take different paths: batches in
    lockstep (one pass per layer), or one pass per group of linears when over the budget."""
    import llmprune.engine.driver as driver

    ids = tiny.random_ids(5, SEQLEN, seed=9)
    config = PruneConfig(method=method, sparsity=0.5, sequential=sequential)
    budget = driver.LOCKSTEP_BUDGET
    results = {}
    for lockstep in (True, False):
        monkeypatch.setattr(driver, "LOCKSTEP_BUDGET", budget if lockstep else 0)
        monkeypatch.setattr(driver, "LOCKSTEP_SHARE", 1 / 3 if lockstep else 0)
        for batch_size in (1, 2, len(ids)):
            model = fresh(models, "llama")
            report = prune(model, config, ids, device="cpu", batch_size=batch_size)
            assert report.batch_size == batch_size
            assert report.one_pass == (sequential and lockstep)
            results[lockstep, batch_size] = pruned_weights(model)
    whole = results.pop((True, len(ids)))
    for key, split in results.items():
        for name in whole:
            assert torch.equal(split[name] == 0, whole[name] == 0), f"{key=} {name}: masks differ"
            assert_close(split[name], whole[name], 1e-4)


@pytest.mark.parametrize("batch_size", [1, None])
def test_sequential_prunes_later_groups_from_pruned_inputs(models, batch_size):
    """In the first decoder layer q/k/v see the same input either way; o_proj and the MLP see
    the outputs of already pruned linears only when sequential, so their masks change."""
    ids = tiny.random_ids(4, SEQLEN, seed=10)
    results = {}
    for sequential in (False, True):
        model = fresh(models, "llama")
        prune(model, PruneConfig(method="wanda", sparsity=0.5, sequential=sequential), ids,
              device="cpu", batch_size=batch_size)
        results[sequential] = pruned_weights(model)
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{name}"
        assert torch.equal(results[True][key], results[False][key]), key
    for key in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        assert not torch.equal(results[True][key] == 0, results[False][key] == 0), key


def test_linears_sharing_an_input_share_statistics(models):
    """q/k/v read one tensor, gate/up another: each group gets one set of statistics, and the
    groups come in call order (what true-sequential pruning follows)."""
    from llmprune.engine.driver import _Watcher
    from llmprune.engine.model import find_linears

    model = fresh(models, "llama")
    _, layers = find_decoder_layers(model)
    ids = tiny.random_ids(2, SEQLEN, seed=3)
    hidden, calls = capture_layer_calls(model, layers, [ids])
    watcher = _Watcher(find_linears(layers[0]), {"hessian"}, CPU, "all")
    with torch.no_grad():
        watcher.run(layers[0], hidden, calls[0])
    leaders = {name.split(".")[-1]: lead.split(".")[-1] for name, lead in watcher.leader.items()}
    assert leaders == {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                       "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}
    assert [n.split(".")[-1] for n in watcher.order][:1] == ["q_proj"]
    assert sorted(lead.split(".")[-1] for lead in watcher.stats) == ["down_proj", "gate_proj", "o_proj", "q_proj"]
