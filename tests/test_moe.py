"""Mixture-of-experts models: fused 3-D expert weights pruned expert by expert, from the tokens
routed to each, on tiny random models of seven families built from their transformers configs."""

from __future__ import annotations

import copy
import math
import re

import pytest
import tiny
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llmprune import PruneConfig, prune
from llmprune.engine.capture import LayerCall
from llmprune.engine.driver import StatSet, prune_layer, visit_layer
from llmprune.engine.experts import expert_containers, layout_of, unfused
from llmprune.engine.model import find_decoder_layers, routers
from llmprune.methods import HESSIAN, get_method
from llmprune.methods.base import Options

ARCHS = list(tiny.MOE_ARCHITECTURES)
SEQLEN = 24
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in tiny.MOE_ARCHITECTURES.items()}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def expert_slices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert's gate, up and down matrix as (out, in), read from the fused parameters
    with the layout transformers documents (independently of llmprune's unfusing)."""
    found = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if "down_proj" not in params or params["down_proj"].ndim != 3:
            continue
        up, down = params["gate_up_proj"], params["down_proj"]
        # Llama 4's experts carry no layout flags: stored (in, out), gate then up (bmm(x, gate_up_proj)).
        transposed, concatenated = getattr(module, "is_transposed", True), getattr(module, "is_concatenated", True)
        for e in range(up.shape[0]):
            u, d = (up[e].T, down[e].T) if transposed else (up[e], down[e])
            gate, upper = (u[::2], u[1::2]) if not concatenated else u.chunk(2)
            found.update({f"{name}.{e}.gate": gate, f"{name}.{e}.up": upper, f"{name}.{e}.down": d})
    return found


def router_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    _, layers = find_decoder_layers(model)
    return {f"{i}.{name}.{p}": t.detach().clone() for i, layer in enumerate(layers)
            for name, r in routers(layer).items() for p, t in r.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_is_found_and_sparsity_zero_reproduces_the_model(models, arch):
    model = copy.deepcopy(models[arch])
    _, layers = find_decoder_layers(model)
    moe = [i for i, layer in enumerate(layers) if expert_containers(layer)]
    assert moe == ([1, 2] if arch == "deepseek_v3" else [0, 1])  # DeepSeek's first layer is dense
    probe = tiny.random_ids(2, SEQLEN, seed=4)
    expected = logits(model, probe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune(model, PruneConfig(method="wanda", sparsity=0.0), tiny.random_ids(3, SEQLEN, seed=3), device="cpu")
    # The routed forward of the unfused experts is the container's own computation.
    assert (logits(model, probe) - expected).abs().max().item() < 1e-5
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert report.one_pass  # every expert runs on every batch: the lockstep holds despite routing
    assert not report.unpruned
    # The unfused experts route exactly as the container does: each MoE block's own output.
    hidden = torch.randn(2, SEQLEN, tiny.HIDDEN, generator=torch.Generator().manual_seed(5))
    for i in moe:
        for name in expert_containers(layers[i]):
            block = layers[i].get_submodule(name.rpartition(".")[0])
            with torch.no_grad():
                own = block(hidden)
                for mode in ("routed", "weighted", "all"):
                    with unfused(layers[i], mode):
                        mine = block(hidden)
                    first = (own[0], mine[0]) if isinstance(own, tuple) else (own, mine)
                    torch.testing.assert_close(first[1], first[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "unstructured"), ("wanda", "2:4"),
                                            ("magnitude", "4:8"), ("sparsegpt", "2:4")])
def test_every_expert_slice_meets_the_pattern_and_routers_are_untouched(models, arch, method, pattern):
    model = copy.deepcopy(models[arch])
    routers_before = router_weights(model)
    sparsity = 0.5 if pattern == "unstructured" else None
    report = prune(model, PruneConfig(method=method, pattern=pattern, sparsity=sparsity,
                                      min_expert_tokens=0), tiny.random_ids(4, SEQLEN, seed=5), device="cpu")
    slices = expert_slices(model)
    assert len(slices) == 3 * tiny.EXPERTS * 2  # two MoE layers
    for name, W in slices.items():
        rows, cols = W.shape
        if pattern == "unstructured":
            assert int((W == 0).sum()) == math.floor(rows * cols * 0.5), name
        else:
            n, m = (int(v) for v in pattern.split(":"))
            assert int(((W != 0).reshape(rows, cols // m, m).sum(-1) > n).sum()) == 0, name
            assert int((W == 0).sum()) == rows * cols * (m - n) // m, name
    assert {k: torch.equal(v, router_weights(model)[k]) for k, v in routers_before.items()} == {
        k: True for k in routers_before}
    # Every weight matrix of the decoder layers is counted; only the routers stay dense.
    assert report.sparsity == pytest.approx(0.5, abs=0.006)
    assert report.linear_sparsity == pytest.approx(0.5, abs=1e-9)
    experts = report.experts()
    assert experts is not None and all(len(c["tokens"]) == tiny.EXPERTS for c in experts["containers"].values())
    # 4 x 24 tokens, top-2: each layer routes 192 token slots to its experts.
    assert all(sum(c["tokens"]) == 4 * SEQLEN * tiny.TOP_K for c in experts["containers"].values())


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_moe_checkpoint_loads_stock_with_the_same_logits(models, arch, tmp_path):
    model = copy.deepcopy(models[arch])
    prune(model, PruneConfig(method="sparsegpt", pattern="2:4"), tiny.random_ids(4, SEQLEN, seed=6), device="cpu")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    probe = tiny.random_ids(2, SEQLEN, seed=7)
    assert torch.equal(logits(loaded, probe), logits(model, probe))
    assert all(torch.equal(a, b) for a, b in zip(expert_slices(loaded).values(), expert_slices(model).values(),
                                                  strict=True))


class FixedRouting(nn.Module):
    """A decoder-layer stand-in: an expert container whose routing is fixed by token position
    (token t goes to expert route[t] alone, weight 1), so the expected statistics are known."""

    def __init__(self, route: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        config = Qwen3MoeConfig(hidden_size=8, moe_intermediate_size=4, num_experts=3, num_experts_per_tok=1)
        torch.manual_seed(0)
        self.experts = Qwen3MoeExperts(config)
        nn.init.normal_(self.experts.gate_up_proj)
        nn.init.normal_(self.experts.down_proj)
        self.route, self.weight = route, torch.ones(len(route)) if weight is None else weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        index = self.route.repeat(hidden.shape[0])[:, None]
        weights = self.weight.repeat(hidden.shape[0])[:, None].to(flat.dtype)
        return self.experts(flat, index, weights).reshape(hidden.shape)


def expert_targets(block: nn.Module) -> dict[str, nn.Module]:
    return {f"experts.{e}.{k}": block.experts.get_submodule(f"{e}.{k}") for e in range(3)
            for k in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("mode", ["routed", "weighted"])
def test_each_experts_statistics_come_from_exactly_its_routed_tokens(mode):
    route = torch.tensor([0, 1, 0, 0, 1, 0])  # per position; expert 2 gets no token
    weight = torch.tensor([0.5, 1.0, 0.25, 1.0, 0.75, 2.0])
    block = FixedRouting(route, weight).eval()
    hidden = [torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))]
    seen: dict[str, StatSet] = {}
    with torch.no_grad(), unfused(block, mode):
        visit_layer(block, hidden, [LayerCall((), {}, False)], expert_targets(block), {HESSIAN},
                    lambda n, s: seen.__setitem__(n, s), False, CPU)
    x = hidden[0].reshape(-1, 8)
    fused = block.experts
    for e in range(3):
        rows, w = x[route.repeat(2) == e], weight.repeat(2)[route.repeat(2) == e]
        assert seen[f"experts.{e}.gate_proj"].tokens == rows.shape[0] == (8, 4, 0)[e]
        if rows.shape[0] == 0:
            continue
        scale = w[:, None] if mode == "weighted" else torch.ones_like(w)[:, None]
        torch.testing.assert_close(seen[f"experts.{e}.gate_proj"].raw()[HESSIAN],
                                   2 * (rows * scale).T @ rows / rows.shape[0])
        assert seen[f"experts.{e}.up_proj"] is seen[f"experts.{e}.gate_proj"]  # one input, one set
        gate, up = (rows @ fused.gate_up_proj[e].T).chunk(2, dim=-1)
        product = fused.act_fn(gate) * up
        torch.testing.assert_close(seen[f"experts.{e}.down_proj"].raw()[HESSIAN],
                                   2 * (product * scale).T @ product / rows.shape[0])


def test_all_token_statistics_see_every_token_and_count_the_routed_ones():
    route = torch.tensor([0, 1, 0, 0, 1, 0])
    block = FixedRouting(route).eval()
    hidden = [torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))]
    seen: dict[str, StatSet] = {}
    with torch.no_grad():
        expected = block(hidden[0])
        with unfused(block, "all"):
            out = visit_layer(block, hidden, [LayerCall((), {}, False)], expert_targets(block), {HESSIAN},
                              lambda n, s: seen.__setitem__(n, s), False, CPU)
    x = hidden[0].reshape(-1, 8)
    assert torch.allclose(out[0], expected, atol=1e-6)  # the output still uses the routed tokens only
    for e in range(3):
        assert (seen[f"experts.{e}.gate_proj"].tokens, seen[f"experts.{e}.gate_proj"].rows) == ((8, 4, 0)[e], 12)
        torch.testing.assert_close(seen[f"experts.{e}.gate_proj"].raw()[HESSIAN], 2 * x.T @ x / 12)


class PreRouted(nn.Module):
    """A decoder-layer stand-in around Llama 4's MoE block: every token goes to every expert,
    scaled by its sigmoid router score (zero where the router's top-1 is another expert)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import Llama4TextConfig
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

        config = Llama4TextConfig(hidden_size=8, intermediate_size=4, intermediate_size_mlp=16, num_local_experts=3,
                                  num_experts_per_tok=1)
        torch.manual_seed(0)
        self.feed_forward = Llama4TextMoe(config)
        for param in self.feed_forward.parameters():
            nn.init.normal_(param)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(hidden)[0].reshape(hidden.shape)


@pytest.mark.parametrize("mode", ["routed", "weighted", "all"])
def test_pre_routed_experts_take_their_statistics_from_the_scaled_rows_they_see(mode):
    block = PreRouted().eval()
    moe = block.feed_forward
    hidden = [torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))]
    targets = {f"feed_forward.experts.{e}.{k}": None for e in range(3) for k in ("gate_proj", "up_proj", "down_proj")}
    seen: dict[str, StatSet] = {}
    with torch.no_grad():
        expected = block(hidden[0])
        x = hidden[0].reshape(-1, 8)
        scores = moe.router(x)[0]  # (T, E): the sigmoid score of the chosen expert, 0 elsewhere
        with unfused(block, mode):
            found = {n: block.get_submodule(n) for n in targets}
            out = visit_layer(block, hidden, [LayerCall((), {}, False)], found, {HESSIAN},
                              lambda n, s: seen.__setitem__(n, s), False, CPU)
    torch.testing.assert_close(out[0], expected)  # the block's own output
    assert {len(routers(block))} == {1}  # the router is found beside the pre-routed container
    fused = moe.experts
    for e in range(3):
        routed = scores[:, e] > 0
        s = scores[routed, e][:, None]
        rows = s * x[routed]  # what the expert's weights see: the router-scaled tokens
        stats = seen[f"feed_forward.experts.{e}.gate_proj"]
        assert stats.tokens == int(routed.sum())
        if mode == "all":  # every token; the ones not routed here enter unscaled
            rows = torch.where(routed[:, None], scores[:, e:e + 1] * x, x)
        if rows.shape[0] == 0:
            continue
        scale = s if mode == "weighted" else torch.ones(rows.shape[0], 1)
        torch.testing.assert_close(stats.raw()[HESSIAN], 2 * (rows * scale).T @ rows / rows.shape[0])
        gate, up = (rows @ fused.gate_up_proj[e]).chunk(2, dim=-1)
        product = fused.act_fn(gate) * up
        torch.testing.assert_close(seen[f"feed_forward.experts.{e}.down_proj"].raw()[HESSIAN],
                                   2 * (product * scale).T @ product / rows.shape[0])
    assert sum(seen[f"feed_forward.experts.{e}.gate_proj"].tokens for e in range(3)) == 12


def test_a_starving_expert_is_pruned_by_magnitude_and_recorded():
    route = torch.tensor([0, 1, 0, 0, 1, 0])
    block = FixedRouting(route).eval()
    hidden = [torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))]
    magnitude = get_method("magnitude")
    with torch.no_grad(), unfused(block):
        starving = block.experts.get_submodule("2.up_proj").weight.detach().clone()
        _, reports = prune_layer(block, hidden, [LayerCall((), {}, False)], get_method("sparsegpt"),
                                 Options(sparsity=0.5, update="obs"), True, CPU, min_expert_tokens=5)
        # Magnitude reads no statistics: nothing starves, nothing is called a fallback.
        _, plain = prune_layer(block, hidden, [LayerCall((), {}, False)], magnitude, Options(sparsity=0.5), True,
                               CPU, min_expert_tokens=5)
    assert {r.fallback for r in plain} == {None} and [r.tokens for r in plain][::3] == [8, 4, 0]
    by_name = {r.name: r for r in reports}
    # Expert 0: 8 tokens (its statistics); expert 1: 4 < 5; expert 2: none. Both fall back.
    assert [by_name[f"experts.{e}.gate_proj"].tokens for e in range(3)] == [8, 4, 0]
    assert [by_name[f"experts.{e}.down_proj"].fallback for e in range(3)] == [None, "magnitude", "magnitude"]
    expected = magnitude.prune(starving.float(), {}, Options(sparsity=0.5)).weight
    up = layout_of(block.experts)
    assert up is not None and not up.transposed
    assert torch.equal(block.experts.gate_up_proj[2, 4:], expected)


def test_router_weighted_and_all_token_statistics(models):
    """``weighted`` scales each routed token's row by √(routing weight); ``all`` gives every
    expert every token; neither changes the layer's output."""
    base = models["qwen3_moe"]
    ids = tiny.random_ids(3, SEQLEN, seed=8)
    probe = tiny.random_ids(2, SEQLEN, seed=9)
    results, masked = {}, {}
    for mode in ("routed", "weighted", "all"):
        model = copy.deepcopy(base)
        report = prune(model, PruneConfig(method="wanda", sparsity=0.0, expert_statistics=mode), ids, device="cpu")
        assert torch.allclose(logits(model, probe), logits(base, probe), atol=1e-5)
        results[mode] = report
        masked[mode] = copy.deepcopy(base)
        prune(masked[mode], PruneConfig(method="wanda", sparsity=0.5, expert_statistics=mode, min_expert_tokens=0),
              ids, device="cpu")
    tokens = {m: results[m].experts()["containers"]["model.layers.0.mlp.experts"]["tokens"]  # type: ignore[index]
              for m in ("routed", "weighted", "all")}
    assert tokens["routed"] == tokens["weighted"] == tokens["all"]
    assert sum(tokens["routed"]) == 3 * SEQLEN * tiny.TOP_K
    # Each mode's statistics choose other masks for the experts (the attention's are the same).
    masks = {m: {n: W == 0 for n, W in expert_slices(masked[m]).items()} for m in ("routed", "weighted", "all")}
    for other in ("weighted", "all"):
        assert any(not torch.equal(masks["routed"][n], masks[other][n]) for n in masks["routed"]), other


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_an_moe_model_writes_what_the_in_memory_path_writes(arch, tokenizer, text_file, tmp_path):
    from test_stream import job, save, tensors

    from llmprune.jobs.pipeline import run

    source = save(tiny.MOE_ARCHITECTURES[arch](len(tokenizer)), tokenizer, tmp_path / "src")
    stored = set(tensors(source))
    # gpt-oss and Llama 4 store their experts fused; the other families one matrix per expert,
    # which transformers fuses while loading and splits again while saving (and so does streaming).
    per_expert = any(re.search(r"\.experts\.\d+\.", n) for n in stored)
    assert per_expert == (arch not in ("gpt_oss", "llama4"))
    memory = run(job(source, text_file, tmp_path / "mem", stream="off"))
    streamed = run(job(source, text_file, tmp_path / "str", stream="on"))
    assert streamed["streaming"] is not None and memory.get("streaming") is None
    for key in ("ppl_dense", "ppl_pruned"):  # streamed: each layer read (and converted) from its shards
        assert streamed["evaluation"][key] == pytest.approx(memory["evaluation"][key], rel=1e-5), key
    expected, actual = tensors(tmp_path / "mem"), tensors(tmp_path / "str")
    assert set(expected) == set(actual) == stored
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # Stock loading reads the streamed folder into the fused model, the experts pruned.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "str").eval()
    for name, weight in expert_slices(loaded).items():
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name
    assert streamed["sparsity_achieved"] == memory["sparsity_achieved"] == pytest.approx(0.5, abs=0.006)
    assert streamed["experts"] == memory["experts"] and memory["experts"]["statistics"] == "routed"
    assert not memory["unpruned_weights"]
    card = (tmp_path / "mem" / "README.md").read_text()
    assert "| experts | 2 MoE layers, 8–8 experts each" in card


@pytest.mark.parametrize("arch", ARCHS)
def test_a_checkpoint_reads_under_the_model_names_as_stock_loading_reads_it(models, arch, tmp_path):
    from safetensors.torch import load_file

    from llmprune.engine.stream import build_skeleton
    from llmprune.io.converted import ModelCheckpoint, stored_layout
    from llmprune.io.shards import Checkpoint

    models[arch].save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    skeleton = build_skeleton(tmp_path, None)
    view = ModelCheckpoint(skeleton, Checkpoint(tmp_path))
    assert {n for n, _ in skeleton.named_parameters()} <= view.names <= set(skeleton.state_dict())
    read = view.read(sorted(view.names))
    assert {n: tuple(t.shape) for n, t in read.items()} == view.shapes
    for name, tensor in read.items():
        assert torch.equal(tensor, stock[name]), name
    # One layer back into the stored layout: exactly the stored tensors of that layer.
    saved = load_file(tmp_path / "model.safetensors")
    layer = stored_layout(skeleton, {n: t for n, t in read.items() if n.startswith("model.layers.1.")})
    assert set(layer) == {n for n in saved if n.startswith("model.layers.1.")}
    for name, tensor in layer.items():
        assert torch.equal(tensor, saved[name]), name


def test_an_interrupted_streaming_moe_run_resumes_to_the_same_bytes(tokenizer, text_file, tmp_path):
    from test_stream import JOURNAL, kill_after, resume_job, save, shard_bytes

    from llmprune.jobs.pipeline import run

    source = save(tiny.MOE_ARCHITECTURES["qwen3_moe"](len(tokenizer)), tokenizer, tmp_path / "src")
    whole = run(resume_job(source, text_file, tmp_path / "whole"))
    out = tmp_path / "killed"
    kill_after(1, source, text_file, out, tmp_path)  # killed after the first MoE layer is journaled
    resumed = run(resume_job(source, text_file, out, resume=True))
    assert resumed["streaming"]["resumed_at_layer"] == 1
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    # The resumed record still lists every MoE layer's routed tokens, as the whole run's does.
    assert resumed["experts"] == whole["experts"] and len(resumed["experts"]["containers"]) == 2
    assert not (out / JOURNAL).exists()


# --- expert removal ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_removal_gives_a_smaller_stock_loadable_model(models, arch, tmp_path):
    from llmprune.structured.experts import remove_experts
    from llmprune.structured.run import StructuredConfig

    model = copy.deepcopy(models[arch])
    if arch == "deepseek_v3":  # its router's score-correction bias (a buffer) must be sliced with it
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(5)))
        models = {arch: copy.deepcopy(model)}
    before = sum(p.numel() for p in model.parameters())
    small, report = remove_experts(model, StructuredConfig("experts", sparsity=0.25),
                                     tiny.random_ids(4, SEQLEN, seed=1), device="cpu")
    assert (report.experts_before, report.experts_after, report.config.score) == (8, 6, "reap")
    assert all(len(e["removed_experts"]) == 2 for e in report.errors) and len(report.errors) == 2
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    count = next(getattr(loaded.config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                 if isinstance(getattr(loaded.config, k, None), int))
    assert count == 6 and loaded.config.num_experts_per_tok == tiny.TOP_K
    assert sum(p.numel() for p in loaded.parameters()) == report.params_after < before
    for name, module in loaded.named_modules():
        if layout_of(module) is not None:
            assert all(p.shape[0] == 6 for p in module.parameters(recurse=False)), name
    probe = tiny.random_ids(2, SEQLEN, seed=2)
    assert torch.equal(logits(loaded, probe), logits(small, probe))
    # The removed experts' slices are gone, the kept ones unchanged, the router's rows with them.
    dense = expert_slices(models[arch])
    container = next(n for n, m in models[arch].named_modules() if layout_of(m) is not None)
    gone = report.errors[0]["removed_experts"]
    kept = [e for e in range(8) if e not in gone]
    for new, old in enumerate(kept):
        assert torch.equal(expert_slices(small)[f"{container}.{new}.down"], dense[f"{container}.{old}.down"])
    parent = container.rpartition(".")[0]  # model.layers.<i>.mlp: the router is a sibling of the experts
    checked = 0
    for child, router in models[arch].get_submodule(parent).named_children():
        if child == "experts" or not any(t.ndim and t.shape[0] == 8 for t in router.state_dict().values()):
            continue
        for key, tensor in router.state_dict().items():
            assert torch.equal(small.get_submodule(f"{parent}.{child}").state_dict()[key], tensor[kept]), key
            checked += 1
    assert checked >= 1


def test_expert_scores_know_their_answers():
    """REAP: mean over routed tokens of routing weight × output norm; REAP-sum: their sum;
    frequency: token counts. Expert 1 has the higher mean but half the tokens: the two REAPs order
    experts 0 and 1 differently."""
    from llmprune.structured.experts import _Tally

    tally = _Tally(3)
    tally.observe("m", 0, torch.tensor([0.5, 0.5]), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # 0.5*5 + 0.5*2
    tally.observe("m", 1, torch.tensor([1.0]), torch.tensor([[0.0, 2.0]]))
    reap, tokens = tally.scores("m", "reap", torch.Generator())
    assert reap.tolist() == [1.75, 2.0, 0.0] and tokens.tolist() == [2, 1, 0]
    assert tally.scores("m", "reap-sum", torch.Generator())[0].tolist() == [3.5, 2.0, 0.0]
    assert tally.scores("m", "frequency", torch.Generator())[0].tolist() == [2, 1, 0]


def test_expert_removal_from_the_command_line_and_its_bad_input(tokenizer, text_file, tmp_path, capsys):
    import json

    from test_errors import FAST, refused
    from test_safety import run

    folder = tmp_path / "moe"
    tiny.qwen3_moe(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--calib", str(text_file), *FAST, "--pattern", "experts", "--out", str(out)]
    code, _, _ = run([*argv, "--sparsity", "0.25", "--method", "frequency", "--decode-tokens", "4",
                      "--then-sparsity", "0.5"], capsys)
    assert code == 0
    record = json.loads((out / "llmprune.json").read_text())
    # Then the rest pruned 50% (default recipe), measured over every decoder-layer matrix.
    assert record["then_sparsity"]["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    saved = AutoModelForCausalLM.from_pretrained(out)
    experts = saved.model.layers[0].mlp.experts.gate_up_proj
    assert experts.shape[0] == 6 and (experts == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert record["method"] == "frequency" and record["structure"]["experts_per_moe_layer"] == [8, 6]
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert record["weights_bytes"]["after"] < record["weights_bytes"]["before"]
    assert record["decode_speed"]["tokens_per_s_pruned"] > 0
    assert "| experts per MoE layer | 8 | 6" in (out / "README.md").read_text()
    dense = tmp_path / "dense"
    tiny.llama(len(tokenizer)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    for model, sparsity, words in ((dense, "0.25", "has none"), (folder, "0.99", "removes all 8 experts"),
                                   (folder, "0.85", "fewer than the 2 each token is routed to")):
        message = refused(["--model", str(model), "--calib", str(text_file), *FAST, "--pattern", "experts",
                           "--sparsity", sparsity, "--out", str(tmp_path / "x")], tmp_path, capsys)
        assert words in message, message
    message = refused([*argv[:-2], "--sparsity", "0.25", "--method", "obd", "--out", str(tmp_path / "y")],
                      tmp_path, capsys)
    assert "reap, reap-sum, frequency, random" in message


def test_a_multimodal_llama4_is_refused_and_its_language_model_prunes_from_the_command_line(
        tokenizer, text_file, tmp_path, capsys):
    """Llama 4 as released is multimodal: loading it as a causal LM would drop its vision tower, so
    it is refused with the way out; the language model saved alone prunes, experts included."""
    import json

    from test_errors import FAST, refused
    from test_safety import run
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    text = tiny.llama4(len(tokenizer)).config.to_dict()
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
              "projector_output_dim": tiny.HIDDEN}
    both = tmp_path / "scout"
    Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).save_pretrained(both)
    tokenizer.save_pretrained(both)
    message = refused(["--model", str(both), "--calib", str(text_file), *FAST, "--sparsity", "0.5",
                       "--out", str(tmp_path / "x")], tmp_path, capsys)
    assert "multimodal checkpoint" in message and ".language_model.save_pretrained" in message, message
    alone = tmp_path / "text"
    Llama4ForConditionalGeneration.from_pretrained(both).language_model.save_pretrained(alone)
    tokenizer.save_pretrained(alone)
    out = tmp_path / "out"
    code, _, _ = run(["--model", str(alone), "--calib", str(text_file), *FAST, "--method", "sparsegpt",
                      "--pattern", "2:4", "--min-expert-tokens", "0", "--out", str(out)], capsys)
    assert code == 0
    record = json.loads((out / "llmprune.json").read_text())
    assert not record["unpruned_weights"] and record["sparsity_of_pruned_linears"] == pytest.approx(0.5)
    assert set(record["experts"]["containers"]) == {f"model.layers.{i}.feed_forward.experts" for i in (0, 1)}
    for name, weight in expert_slices(AutoModelForCausalLM.from_pretrained(out)).items():
        rows, cols = weight.shape
        assert int(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) > 2).sum()) == 0, name


@pytest.mark.slow
def test_the_smollm2_test_bed_is_the_dense_model_with_all_experts_and_routes_with_fewer(tmp_path):
    """The real-weights MoE of the quality benchmark (scripts/bench_moe.py): with top_k = E and
    a zero router it computes SmolLM2 itself; with a fitted router and top-2 of 8 the experts a
    token reaches depend on the token, and the folder loads with stock transformers."""
    import llmprune
    from llmprune.io.moe_testbed import build_moe

    dense, tokenizer = llmprune.load_model("smollm2-135m")
    probe = llmprune.calibration_data(tokenizer, "wikipedia", nsamples=1, seqlen=64, seed=3)
    exact = build_moe(dense, experts=8, top_k=8)
    reference = logits(dense, probe)
    assert (logits(exact, probe) - reference).abs().max().item() < 1e-3 * reference.abs().max().item()
    del exact
    text = llmprune.calibration_data(tokenizer, "wikipedia", nsamples=2, seqlen=256, seed=1)
    sparse = build_moe(dense, experts=8, top_k=2, calibration=text)
    chosen: list[torch.Tensor] = []
    gate = sparse.model.layers[5].mlp.gate
    handle = gate.register_forward_hook(lambda m, a, out: chosen.append(out[2]))
    logits(sparse, probe)
    handle.remove()
    assert len(torch.unique(chosen[0].sort(dim=-1).values, dim=0)) > 4  # many different expert pairs
    sparse.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, probe), logits(sparse, probe))


def test_group_routing_loses_the_same_number_of_experts_from_every_group(tmp_path):
    """DeepSeek-V3's router picks top groups of contiguous experts first (n_group): removal takes
    the same count from each group, so the experts kept stay in their groups."""
    from transformers import DeepseekV3ForCausalLM

    from llmprune.errors import LlmpruneError
    from llmprune.structured.experts import plan_removal, remove_experts
    from llmprune.structured.run import StructuredConfig

    config = tiny.deepseek_v3().config
    config.n_group, config.topk_group = 2, 1
    model = tiny._finish(DeepseekV3ForCausalLM(config), 0)
    _, report = remove_experts(copy.deepcopy(model), StructuredConfig("experts", sparsity=0.25, score="frequency"),
                               tiny.random_ids(4, SEQLEN, seed=1), device="cpu")
    for entry in report.errors:
        gone = entry["removed_experts"]
        assert len([e for e in gone if e < 4]) == len([e for e in gone if e >= 4]) == 1
    with pytest.raises(LlmpruneError, match="multiple of 2"):
        plan_removal(model, 0.125)  # one expert: not one per group
    with pytest.raises(LlmpruneError, match="too few"):
        plan_removal(model, 0.75)  # 1 expert left per group: a group's score is its top two


def test_a_bfloat16_model_keeps_its_float32_router_through_pruning(tmp_path):
    """DeepSeek-V3 keeps its router in float32 beside bfloat16 weights; a CPU run computes the
    layer in float32 and must return each tensor to its own dtype, the router unrounded."""
    tiny.deepseek_v3().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and model.model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    before = {n: t.clone() for n, t in gate.state_dict().items()}
    prune(model, PruneConfig(method="sparsegpt", pattern="2:4"), tiny.random_ids(4, SEQLEN, seed=5), device="cpu")
    for name, tensor in gate.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
    experts = model.model.layers[1].mlp.experts
    assert experts.down_proj.dtype == torch.bfloat16 and (experts.down_proj == 0).float().mean().item() == 0.5
