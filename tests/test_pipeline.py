"""The job pipeline: typed progress from every stage, cancellation inside each long stage (and
nothing published after it), and concurrent jobs that do not interfere."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tiny
import torch

from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.errors import Cancelled
from llmprune.jobs.pipeline import STAGES, EvalConfig, Job, TasksConfig, run
from llmprune.progress import Event
from llmprune.structured.run import StructuredConfig

DATA = Path(__file__).parent / "data"
TASK = "llmprune_wiki_mc"


def job(model: Path, text: Path, out: Path | None, prune=None, **kw) -> Job:
    kw.setdefault("evaluation", EvalConfig(str(text), 32, 4))
    return Job(model=str(model), prune=prune or PruneConfig("sparsegpt", "2:4"),
               calibration=CalibrationConfig(str(text), 4, 32), out=str(out) if out else None, device="cpu",
               batch_size=2, **kw)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def check_stream(events: list[Event]) -> dict[str, list[Event]]:
    """Events grouped by stage, each stage counting up to its total in its own unit."""
    stages: dict[str, list[Event]] = {}
    for event in events:
        assert isinstance(event, Event) and event.unit and event.total > 0
        stages.setdefault(event.stage, []).append(event)
    for stage, seen in stages.items():
        done = [e.done for e in seen]
        assert done == sorted(done) and done[-1] == seen[-1].total, stage
        assert len({(e.total, e.unit) for e in seen}) == 1, stage
    return stages


def test_every_stage_of_a_sparse_job_reports_typed_events(llama_dir, text_file, tmp_path):
    events: list[Event] = []
    figures: list[dict] = []
    record = run(job(llama_dir, text_file, tmp_path / "out"), progress=events.append, figures=figures.append)
    stages = check_stream(events)
    assert list(stages) == ["load", "calibrate", "eval dense", "prune", "eval pruned", "save"]
    assert stages["prune"] == [Event("prune", n, 2, "layers") for n in range(3)]  # its start, then each layer
    assert stages["eval dense"][-1] == Event("eval dense", 4, 4, "windows")
    assert record["out"] == str(tmp_path / "out")
    # The headline figures as each becomes known (a service shows them mid-run), equal to the record's.
    dense, pruned = record["evaluation"]["ppl_dense"], record["evaluation"]["ppl_pruned"]
    assert figures == [{"ppl_dense": dense}, {"ppl_dense": dense, "sparsity_achieved": record["sparsity_achieved"]},
                       {"ppl_dense": dense, "sparsity_achieved": record["sparsity_achieved"], "ppl_pruned": pruned}]


def test_a_structured_job_reports_its_allocation_and_gradients(llama_dir, text_file, tmp_path):
    # Before, a structured run showed nothing while it computed Taylor gradients or allocated.
    events: list[Event] = []
    config = StructuredConfig("structured", params=0.2, score="taylor")
    run(job(llama_dir, text_file, None, config, evaluation=EvalConfig(None)), progress=events.append)
    stages = check_stream(events)
    assert list(stages) == ["load", "calibrate", "speed dense", "gradients", "allocate", "prune", "speed pruned"]
    assert stages["gradients"][-1] == Event("gradients", 4, 4, "sequences")  # 4 samples, one per backward
    assert stages["allocate"][-1] == Event("allocate", 2, 2, "layers")


def test_a_streamed_job_reports_the_same_stages(llama_dir, text_file, tmp_path):
    events: list[Event] = []
    run(job(llama_dir, text_file, tmp_path / "out", stream="on"), progress=events.append)
    stages = check_stream(events)
    assert list(stages) == ["load", "calibrate", "eval dense", "prune", "eval pruned", "save"]
    assert stages["eval dense"][-1].unit == "layers"  # one decoder layer in memory at a time


def cancel_at(stage: str, done: int = 0):
    """(progress, cancel): cancel once ``stage`` has reported ``done`` steps."""
    seen = {"hit": False}

    def progress(event: Event) -> None:
        if event.stage == stage and event.done >= done:
            seen["hit"] = True

    return progress, lambda: seen["hit"]


@pytest.mark.parametrize(("stage", "done", "kind"), [
    ("load", 0, "sparse"), ("calibrate", 0, "sparse"), ("eval dense", 2, "sparse"), ("prune", 1, "sparse"),
    ("eval pruned", 2, "sparse"), ("save", 0, "sparse"),
    ("save", 1, "sparse"),  # the checkpoint is written, not yet published
    ("gradients", 2, "taylor"), ("allocate", 1, "taylor"), ("prune", 1, "taylor"),
    ("eval dense", 1, "stream"), ("prune", 1, "stream"), ("eval pruned", 1, "stream"), ("save", 0, "stream"),
    ("save", 1, "stream"),  # its journal is gone with the metadata written: nothing left to resume
])
def test_cancel_inside_each_stage_publishes_nothing(llama_dir, text_file, tmp_path, stage, done, kind):
    progress, cancel = cancel_at(stage, done)
    out = tmp_path / "out"
    extra: dict = {"stream": "on"} if kind == "stream" else {}
    config = StructuredConfig("structured", params=0.2, score="taylor") if kind == "taylor" else None
    with pytest.raises(Cancelled, match="cancelled"):
        run(job(llama_dir, text_file, out, config, **extra), progress=progress, cancel=cancel)
    left = leftovers(tmp_path)
    assert "out" not in left
    if kind == "stream" and (stage in ("prune", "eval pruned") or (stage, done) == ("save", 0)):
        assert left == [".out.partial"]  # journaled layers, kept for --resume, which finishes the run
        resumed = run(job(llama_dir, text_file, out, config, resume=True, **extra))
        whole = run(job(llama_dir, text_file, tmp_path / "whole", config, **extra))
        assert resumed["evaluation"] == whole["evaluation"]
        assert shards(out) == shards(tmp_path / "whole")
    else:
        assert left == []


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_cancel_during_lm_eval_stops_it(llama_dir, text_file, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    text = (DATA / "wiki_mc.yaml").read_text().replace("DATA_FILE", str(DATA / "wiki_mc.jsonl"))
    (folder / "wiki_mc.yaml").write_text(text)
    polls = {"started": False, "n": 0}

    def progress(event: Event) -> None:
        polls["started"] |= event.stage == "tasks dense"

    def cancel() -> bool:  # lets lm-eval run a few forward passes, then stops it
        polls["n"] += polls["started"]
        return polls["n"] > 3

    out = tmp_path / "out"
    with pytest.raises(Cancelled, match="during lm-eval"):
        run(job(llama_dir, text_file, out, evaluation=EvalConfig(None),
                tasks=TasksConfig((TASK,), include=str(folder))), progress=progress, cancel=cancel)
    assert leftovers(tmp_path) == ["tasks"]


def test_the_stages_are_one_list():
    names = [s.__name__ for s in STAGES]
    assert names == ["load", "calibrate", "evaluate_dense", "tasks_dense", "speed_dense", "prune",
                     "evaluate_pruned", "tasks_pruned", "speed_pruned", "record", "save", "publish"]


# -- concurrency ------------------------------------------------------------------------------------


def essentials(record: dict) -> tuple:
    return (record["evaluation"]["ppl_dense"], record["evaluation"]["ppl_pruned"], record["sparsity_achieved"],
            [r["error"] for r in record["layers"]])


def test_two_jobs_in_two_threads_do_not_interfere(llama_dir, text_file, tmp_path):
    sparse = job(llama_dir, text_file, tmp_path / "a")
    other = job(llama_dir, text_file, tmp_path / "b", PruneConfig("wanda", "unstructured", 0.6))
    alone = [essentials(run(job(llama_dir, text_file, None, c.prune))) for c in (sparse, other)]
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def work(name: str, spec: Job) -> None:
        try:
            results[name] = run(spec)
        except BaseException as exc:
            errors.append(exc)

    from transformers import PreTrainedModel
    from transformers.initialization import TORCH_INIT_FUNCTIONS

    before = (PreTrainedModel.init_weights, {name: getattr(torch.nn.init, name) for name in TORCH_INIT_FUNCTIONS
                                             if hasattr(torch.nn.init, name)})
    threads = [threading.Thread(target=work, args=(n, s)) for n, s in (("a", sparse), ("b", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert errors == []
    # transformers swaps these for no-ops while it builds a model; two builds at once could
    # leave the no-ops in place for the whole process (every later model uninitialised, its
    # tied head untied)
    assert (PreTrainedModel.init_weights, {n: getattr(torch.nn.init, n) for n in before[1]}) == before
    tied = tiny.gemma3()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert [essentials(results["a"]), essentials(results["b"])] == alone
    for name in ("a", "b"):
        saved = json.loads((tmp_path / name / "llmprune.json").read_text())
        assert saved["method"] == results[name]["method"] and saved["files"] == leftovers(tmp_path / name)
    assert leftovers(tmp_path) == ["a", "b"]


def test_two_jobs_in_two_processes_do_not_interfere(llama_dir, text_file, tmp_path):
    def command(out: str, method: str) -> list[str]:
        return [sys.executable, "-m", "llmprune.cli", "--model", str(llama_dir), "--method", method,
                "--pattern", "2:4", "--nsamples", "4", "--seqlen", "32", "--calib", str(text_file),
                "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "4", "--threads", "1",
                "--quiet", "--device", "cpu", "--batch-size", "2", "--out", str(tmp_path / out),
                "--json", str(tmp_path / f"{out}.json")]

    running = [subprocess.Popen(command(out, method), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for out, method in (("a", "sparsegpt"), ("b", "wanda"))]
    for process in running:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert (a["method"], b["method"]) == ("sparsegpt", "wanda")
    alone = run(job(llama_dir, text_file, None))
    assert a["evaluation"]["ppl_pruned"] == pytest.approx(alone["evaluation"]["ppl_pruned"], rel=1e-6)
    assert leftovers(tmp_path) == ["a", "a.json", "b", "b.json"]
