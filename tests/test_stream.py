"""Streaming (layers read from shards, written as they finish), activation offload, resume after
a kill, placement with accelerate: each must give exactly what the in-memory path gives."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.io.activations import BatchFile
from llmprune.io.journal import FOLDER as JOURNAL
from llmprune.io.shards import INDEX
from llmprune.jobs.pipeline import EvalConfig, Job, run


def save(model, tokenizer, folder: Path, shard: str | None = None) -> Path:
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def job(model: Path, text: Path, out: Path, **kwargs) -> Job:
    prune = kwargs.pop("prune", PruneConfig("sparsegpt", "unstructured", 0.5))
    return Job(model=str(model), prune=prune, calibration=CalibrationConfig(str(text), 6, 32),
               evaluation=EvalConfig(str(text), 32, 3), out=str(out), device="cpu", batch_size=2, **kwargs)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("arch", list(tiny.ARCHITECTURES))
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_skeleton_has_the_buffers_of_a_built_model_and_no_weights(arch, dtype, tmp_path):
    """The skeleton is built on the meta device, which leaves buffers (rotary frequencies,
    embedding scales) on meta too; they must come out as a normal build computes them."""
    from transformers import AutoModelForCausalLM

    from llmprune.engine.stream import build_skeleton

    model = tiny.ARCHITECTURES[arch]()
    model.save_pretrained(tmp_path)
    skeleton = build_skeleton(tmp_path, dtype)
    built = AutoModelForCausalLM.from_config(model.config, dtype=dtype or model.dtype)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    expected, actual = dict(built.named_buffers()), dict(skeleton.named_buffers())
    assert set(actual) == set(expected)
    for name, buffer in expected.items():
        assert actual[name].device.type == "cpu" and actual[name].dtype == buffer.dtype, name
        assert torch.equal(actual[name], buffer), name


def test_a_buffer_the_model_cannot_compute_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmprune.engine.stream import materialise_buffers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny.llama().config)
    model.model.register_buffer("made_elsewhere", torch.ones(3, device="meta"), persistent=False)
    with pytest.raises(LlmpruneError, match="made_elsewhere"):
        materialise_buffers(model)


@pytest.mark.parametrize("arch", list(tiny.ARCHITECTURES))
def test_streaming_writes_what_the_in_memory_path_writes(arch, tokenizer, text_file, tmp_path):
    source = save(tiny.ARCHITECTURES[arch](len(tokenizer)), tokenizer, tmp_path / "src")
    memory = run(job(source, text_file, tmp_path / "mem", stream="off"))
    streamed = run(job(source, text_file, tmp_path / "str", stream="on"))
    assert "streaming" not in memory and streamed["streaming"]["source"] == str(source)
    expected, actual = tensors(tmp_path / "mem"), tensors(tmp_path / "str")
    assert set(expected) == set(actual)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert streamed["evaluation"]["ppl_dense"] == memory["evaluation"]["ppl_dense"]
    assert streamed["evaluation"]["ppl_pruned"] == memory["evaluation"]["ppl_pruned"]
    assert streamed["sparsity_achieved"] == memory["sparsity_achieved"]
    assert [r["error"] for r in streamed["layers"]] == [r["error"] for r in memory["layers"]]
    assert not list(tmp_path.glob(".*partial*"))  # nothing left behind


def test_streaming_without_lockstep_still_writes_what_the_in_memory_path_writes(tokenizer, text_file, tmp_path):
    """More calibration activations than one layer's weights: streaming gives up the one-pass
    lockstep (memory) for one pass per input group, in memory it stays; same tensors either way."""
    from llmprune.engine.driver import LOCKSTEP_BUDGET

    source = save(tiny.llama(len(tokenizer)), tokenizer, tmp_path / "src")
    # generated 0: the default would sample windows in memory and not when streamed.
    calibration = CalibrationConfig(str(text_file), 24, 64, generated=0)
    assert 24 * 64 * tiny.INTERMEDIATE < LOCKSTEP_BUDGET
    memory = run(Job(model=str(source), calibration=calibration, evaluation=EvalConfig(None),
                     out=str(tmp_path / "mem"), device="cpu", batch_size=4, stream="off"))
    streamed = run(Job(model=str(source), calibration=calibration, evaluation=EvalConfig(None),
                       out=str(tmp_path / "str"), device="cpu", batch_size=4, stream="on"))
    assert memory["calibration"]["one_pass"] and not streamed["calibration"]["one_pass"]
    expected, actual = tensors(tmp_path / "mem"), tensors(tmp_path / "str")
    assert all(torch.equal(expected[n], actual[n]) for n in expected)


def test_sharded_source_and_output_load_in_stock_transformers(tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny.llama(len(tokenizer), layers=3)
    source = save(model, tokenizer, tmp_path / "src", shard="40KB")
    assert (source / INDEX).exists() and len(list(source.glob("*.safetensors"))) > 2
    record = run(job(source, text_file, tmp_path / "out", stream="on",
                     prune=PruneConfig("wanda", "2:4", None)))
    out = tmp_path / "out"
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert len(index["weight_map"]) == len(tensors(out))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tiny.random_ids(2, 16, len(tokenizer))
    for name, linear in tiny.decoder_linears(loaded, "model.layers").items():
        kept = (linear.weight != 0).reshape(linear.weight.shape[0], -1, 4).sum(-1)
        assert bool((kept <= 2).all()), name
    assert record["sparsity_achieved"] == pytest.approx(0.5)
    # Same logits as the in-memory path's checkpoint.
    run(job(source, text_file, tmp_path / "mem", stream="off", prune=PruneConfig("wanda", "2:4", None)))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert json.loads((out / "llmprune.json").read_text())["memory"]["peak_rss_bytes"] > 0
    assert "sparsity_config" not in json.loads((out / "config.json").read_text())


def test_float16_checkpoint_is_computed_in_float32_on_cpu_and_saved_in_float16(tokenizer, text_file, tmp_path):
    source = save(tiny.llama(len(tokenizer)).half(), tokenizer, tmp_path / "src")
    memory = run(job(source, text_file, tmp_path / "mem", stream="off"))
    streamed = run(job(source, text_file, tmp_path / "str", stream="on"))
    expected, actual = tensors(tmp_path / "mem"), tensors(tmp_path / "str")
    assert {t.dtype for t in actual.values()} == {torch.float16}
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
    assert memory["evaluation"]["ppl_pruned"] == streamed["evaluation"]["ppl_pruned"]


def test_offloaded_activations_give_the_same_checkpoint(tokenizer, text_file, tmp_path):
    source = save(tiny.llama(len(tokenizer), layers=3), tokenizer, tmp_path / "src")
    run(job(source, text_file, tmp_path / "mem", stream="on"))
    record = run(job(source, text_file, tmp_path / "off", offload_dir=str(tmp_path / "acts")))
    assert record["streaming"]["activations_offloaded_to"] == str((tmp_path / "acts").resolve())
    assert shard_bytes(tmp_path / "mem") == shard_bytes(tmp_path / "off")
    assert not list((tmp_path / "acts").iterdir())  # the files are removed at the end


def test_device_map_places_every_layer_with_accelerate(tokenizer, text_file, tmp_path):
    from llmprune.engine.placement import layer_devices, parse_max_memory

    model = tiny.llama(len(tokenizer), layers=3)
    assert layer_devices(model, "model.layers", 3, "auto") == [torch.device("cpu")] * 3
    assert layer_devices(model, "model.layers", 3, "cpu=1GiB") == [torch.device("cpu")] * 3
    assert parse_max_memory("0=20GiB, cpu=64GB") == {0: "20GiB", "cpu": "64GB"}
    with pytest.raises(LlmpruneError, match="DEVICE=SIZE"):
        parse_max_memory("0:20GiB")
    if not torch.cuda.is_available():
        with pytest.raises(LlmpruneError, match="does not exist"):
            layer_devices(model, "model.layers", 3, "0=1GiB,cpu=1GiB")
    source = save(model, tokenizer, tmp_path / "src")
    run(job(source, text_file, tmp_path / "a", stream="on"))
    record = run(job(source, text_file, tmp_path / "b", stream="on", device_map="auto"))
    assert record["streaming"]["layer_devices"] == ["cpu"] * 3
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_in_memory_evaluation_follows_the_device_map(tokenizer, text_file, tmp_path, monkeypatch):
    """With a device map the model is evaluated one layer at a time, each on its mapped device
    (never moved whole to --device), and scores what the whole-model forward scores."""
    import llmprune.jobs.stores as stores

    source = save(tiny.llama(len(tokenizer), layers=3), tokenizer, tmp_path / "src")
    whole = run(job(source, text_file, tmp_path / "a", stream="off"))

    def refused(*args, **kwargs):
        raise AssertionError("the whole model was evaluated on one device")

    monkeypatch.setattr(stores, "perplexity", refused)
    mapped = run(job(source, text_file, tmp_path / "b", stream="off", device_map="auto"))
    assert "streaming" not in mapped
    for key in ("ppl_dense", "ppl_pruned"):
        assert mapped["evaluation"][key] == pytest.approx(whole["evaluation"][key], rel=1e-6)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


# -- resume ------------------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from llmprune.engine.config import CalibrationConfig, PruneConfig
    from llmprune.jobs.pipeline import EvalConfig, Job, run

    def progress(event):
        if event.stage == "prune" and event.done == {after}:
            Path({marker!r}).write_text("ready")
            time.sleep(600)  # killed here, between two layers; layer {after} is journaled

    run(Job(model={model!r}, prune=PruneConfig("sparsegpt", "unstructured", 0.5),
            calibration=CalibrationConfig({text!r}, 6, 32), evaluation=EvalConfig(None),
            out={out!r}, device="cpu", batch_size=2, stream="on"), progress=progress)
""")


def kill_after(layers_done: int, model: Path, text: Path, out: Path, tmp_path: Path) -> None:
    """Run a streaming job in another process and kill -9 it once ``layers_done`` are journaled."""
    marker = tmp_path / "marker"
    script = KILLER.format(tests=str(Path(__file__).parent), after=layers_done, marker=str(marker),
                           model=str(model), text=str(text), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("four")
    return save(tiny.llama(len(tokenizer), layers=4), tokenizer, folder / "src")


def resume_job(model: Path, text: Path, out: Path, **kwargs) -> Job:
    return Job(model=str(model), prune=PruneConfig("sparsegpt", "unstructured", 0.5),
               calibration=CalibrationConfig(str(text), 6, 32), evaluation=EvalConfig(None),
               out=str(out), device="cpu", batch_size=2, stream="on", **kwargs)


def test_resume_after_kill_writes_identical_shards(four_layers, text_file, tmp_path):
    whole = run(resume_job(four_layers, text_file, tmp_path / "whole"))
    out = tmp_path / "killed"
    kill_after(2, four_layers, text_file, out, tmp_path)
    staging = tmp_path / ".killed.partial"
    assert not out.exists() and (staging / JOURNAL / "journal.json").exists()
    assert len(json.loads((staging / JOURNAL / "journal.json").read_text())["layers"]) == 2
    # As if the kill had hit the next shard mid-write: a partial file is there, and ignored.
    (staging / "model-00004-of-00005.safetensors.partial").write_bytes(b"half a shard")
    with pytest.raises(LlmpruneError, match="--resume"):
        run(resume_job(four_layers, text_file, out))
    resumed = run(resume_job(four_layers, text_file, out, resume=True))
    assert resumed["streaming"]["resumed_at_layer"] == 2
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert [r["error"] for r in resumed["layers"]] == [r["error"] for r in whole["layers"]]
    assert not staging.exists() and not (out / JOURNAL).exists()


@pytest.fixture(scope="module")
def killed_run(four_layers, text_file, tmp_path_factory) -> Path:
    """The staging folder of one streaming run killed after its first layer, shared (as a copy)
    by every damage case."""
    work = tmp_path_factory.mktemp("killed")
    kill_after(1, four_layers, text_file, work / "out", work)
    return work / ".out.partial"


@pytest.mark.parametrize("damage", ["journal", "shard", "activations", "settings"])
def test_damaged_journal_is_reported_never_reused(damage, killed_run, four_layers, text_file, tmp_path, capsys):
    import shutil

    from llmprune.cli.commands import main

    out = tmp_path / "out"
    staging = tmp_path / ".out.partial"
    shutil.copytree(killed_run, staging)
    journal = staging / JOURNAL / "journal.json"
    entry = json.loads(journal.read_text())["layers"][0]
    if damage == "journal":
        journal.write_text(journal.read_text()[:40])
    elif damage == "shard":
        shard = staging / entry["shard"]
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "activations":
        acts = staging / JOURNAL / entry["activations"]["file"]
        acts.write_bytes(acts.read_bytes()[:-8])
    # The killed run's own settings (SparseGPT alone), so each damage is what stops the resume.
    argv = ["--model", str(four_layers), "--method", "sparsegpt", "--calib", str(text_file), "--nsamples", "6",
            "--seqlen", "32", "--batch-size", "2", "--sparsity", "0.5", "--eval", "none", "--device", "cpu",
            "--out", str(out), "--stream", "on", "--resume", "--quiet"]
    if damage == "settings":
        argv[argv.index("0.5")] = "0.6"
    assert main(argv) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "Traceback" not in message
    expected = {"journal": "corrupt", "shard": "does not match the resume journal",
                "activations": "does not match the journal", "settings": "differs in config"}[damage]
    assert expected in message
    assert not out.exists() and staging.exists()  # the interrupted work is kept


def test_not_enough_disk_fails_before_work(four_layers, text_file, tmp_path, monkeypatch):
    import shutil as real

    import llmprune.engine.stream as stream

    usage = real.disk_usage(tmp_path)
    monkeypatch.setattr(stream.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    started = []
    monkeypatch.setattr(stream.StreamHost, "load_rest", lambda self: started.append(1))
    with pytest.raises(LlmpruneError, match="not enough disk"):
        run(resume_job(four_layers, text_file, tmp_path / "out"))
    assert not started and not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_streaming_flags_need_a_streamable_job(four_layers, text_file, tmp_path):
    with pytest.raises(LlmpruneError, match="needs streaming"):
        Job(model="m", out="x", resume=True, stream="off")
    with pytest.raises(LlmpruneError, match="give an output folder"):
        Job(model="m", stream="on")


# -- the activation file -----------------------------------------------------------------------

def test_batch_file_clear_starts_again(tmp_path):
    """What a layer whose lockstep run diverged does with the batches it had already written."""
    first, second = torch.randn(2, 3), torch.randn(1, 3)
    stored = BatchFile(tmp_path / "a.bin")
    stored.append(first)
    stored.clear()
    stored.append(second)
    stored.close()
    assert len(stored) == 1 and torch.equal(stored[0], second)
    assert (tmp_path / "a.bin").stat().st_size == second.numel() * 4
    assert BatchFile.reopen(tmp_path, stored.describe()).sha256 == stored.sha256
    with pytest.raises(RuntimeError, match="closed"):
        stored.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_file_round_trip_and_integrity(dtype, tmp_path):
    batches = [torch.randn(2, 5, 8).to(dtype), torch.randn(1, 5, 8).to(dtype)]
    stored = BatchFile(tmp_path / "a.bin")
    for batch in batches:
        stored.append(batch)
    stored.close()
    assert len(stored) == 2 and all(torch.equal(a, b) for a, b in zip(stored, batches, strict=True))
    again = BatchFile.reopen(tmp_path, stored.describe())
    assert torch.equal(again[1], batches[1]) and torch.equal(again[-1], batches[1])
    (tmp_path / "a.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-1])
    with pytest.raises(LlmpruneError, match="does not match the journal"):
        BatchFile.reopen(tmp_path, stored.describe())


def test_a_shard_copied_from_files_is_byte_for_byte_what_safetensors_writes(tmp_path, monkeypatch):
    """Streaming copies the unchanged non-layer tensors (embeddings, head) from the source
    shards by byte range instead of mapping them; the file must be exactly safetensors' own,
    whatever the mix of dtypes and wherever each tensor comes from."""
    from safetensors.torch import save_file

    import llmprune.io.shards as shards

    monkeypatch.setattr(shards, "COPY_CHUNK", 8)  # many chunks per tensor
    gen = torch.Generator().manual_seed(0)
    tensors = {"w.f16": torch.randn(5, 3, generator=gen).half(), "a.bf16": torch.randn(7, generator=gen).bfloat16(),
               "z.f32": torch.randn(2, 9, generator=gen), "m.i64": torch.arange(5), "b.bool": torch.rand(6) > 0.5,
               "q.i8": torch.arange(-3, 8, dtype=torch.int8), "e.f16": torch.randn(4, generator=gen).half()}
    save_file(tensors, str(tmp_path / "expected.safetensors"), metadata={"format": "pt"})
    save_file({k: v for k, v in tensors.items() if k != "z.f32"}, str(tmp_path / "src.safetensors"),
              metadata={"format": "pt"})
    stored = shards.read_header(tmp_path / "src.safetensors")
    seen: dict[str, list[torch.Tensor]] = {}
    parts = {**stored, "z.f32": tensors["z.f32"]}
    shards.copy_shard(tmp_path, "copied.safetensors", parts,
                      lambda name, chunk: seen.setdefault(name, []).append(chunk))
    assert (tmp_path / "copied.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()
    for name in stored:  # the check saw every copied element, in order
        assert torch.equal(torch.cat(seen[name]), tensors[name].reshape(-1)), name
    assert not (tmp_path / "copied.safetensors.partial").exists()


def test_a_damaged_head_is_refused_before_any_layer_is_pruned(tokenizer, text_file, tmp_path):
    """The untied head is never read for a streamed run's capture; it is copied into shard 1 by
    byte range and checked on the way, before the first decoder layer."""
    model = tiny.llama(len(tokenizer))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight[7, 3] = float("inf")
    source = save(model, tokenizer, tmp_path / "src")
    spec = job(source, text_file, tmp_path / "out", stream="on")
    with pytest.raises(LlmpruneError, match=r"lm_head\.weight contains NaN or Inf"):
        run(dataclasses.replace(spec, evaluation=EvalConfig(None)))
    assert not (tmp_path / "out").exists()
    staging = tmp_path / ".out.partial"
    assert not staging.exists() or not list(staging.glob("model-0000[2-9]*.safetensors"))
