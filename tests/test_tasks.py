"""lm-eval through its own API on the in-memory model, offline, on a task shipped with the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.jobs.pipeline import EvalConfig, Job, TasksConfig, run

DATA = Path(__file__).parent / "data"
TASK = "llmprune_wiki_mc"


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """The shipped task YAML, pointed at the shipped JSONL by absolute path."""
    folder = tmp_path_factory.mktemp("tasks")
    text = (DATA / "wiki_mc.yaml").read_text().replace("DATA_FILE", str(DATA / "wiki_mc.jsonl"))
    (folder / "wiki_mc.yaml").write_text(text)
    return folder


def direct_lm_eval(model_dir: Path, task_dir: Path, out: Path) -> dict:
    """What lm-eval's own command line reports for a saved checkpoint."""
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
                    "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "8", "--device", "cpu",
                    "--output_path", str(out), "--seed", "0"], check=True, capture_output=True, timeout=900)
    result = next(out.rglob("results_*.json"))
    return json.loads(result.read_text())["results"][TASK]


def prune_with_tasks(model: str, text: str, task_dir: Path, out: Path, samples: int, seqlen: int) -> dict:
    return run(Job(model=model, prune=PruneConfig("wanda", "unstructured", 0.5),
                   calibration=CalibrationConfig(text, samples, seqlen), evaluation=EvalConfig(None),
                   tasks=TasksConfig((TASK,), include=str(task_dir)), out=str(out), device="cpu"))


def check_against_direct_run(record: dict, out: Path, source: Path | None, task_dir: Path, tmp_path: Path) -> None:
    """The record's task results against lm-eval's own command line on the saved checkpoint and
    (``source`` given) on the dense model."""
    dense, pruned = (record["tasks"][k]["results"][TASK] for k in ("dense", "pruned"))
    assert record["tasks"]["pruned"]["n_samples"][TASK] == 40
    direct = direct_lm_eval(out, task_dir, tmp_path / "direct")
    assert pruned["acc"] == pytest.approx(direct["acc,none"], abs=1e-12)
    assert pruned["acc_norm"] == pytest.approx(direct["acc_norm,none"], abs=1e-12)
    assert pruned["acc_stderr"] == pytest.approx(direct["acc_stderr,none"], abs=1e-12)
    if source is not None:
        direct_dense = direct_lm_eval(source, task_dir, tmp_path / "direct-dense")
        assert dense["acc"] == pytest.approx(direct_dense["acc,none"], abs=1e-12)
    card = (out / "README.md").read_text()
    assert f"| {TASK} | acc | {dense['acc']:.4f}" in card


def test_tasks_on_a_tiny_model_match_a_direct_lm_eval_run(llama_dir, text_file, task_dir, tmp_path):
    out = tmp_path / "out"
    record = prune_with_tasks(str(llama_dir), str(text_file), task_dir, out, 4, 32)
    check_against_direct_run(record, out, llama_dir, task_dir, tmp_path)


@pytest.mark.slow
def test_tasks_on_smollm2_match_a_direct_lm_eval_run(task_dir, tmp_path):

    out = tmp_path / "out"
    record = prune_with_tasks("smollm2-135m", "wikipedia", task_dir, out, 8, 256)
    dense = record["tasks"]["dense"]["results"][TASK]["acc"]
    assert dense > 0.4  # the real model reads Wikipedia: far above the 0.25 of chance
    # The dense side is checked against lm-eval's own run on the tiny model above; here the
    # pruned real model is (a minute of CI time less).
    check_against_direct_run(record, out, None, task_dir, tmp_path)


def test_tasks_under_a_device_map_match_the_run_without(llama_dir, text_file, task_dir):
    """With --device-map, lm-eval runs each layer where the map puts it (here every device is the
    CPU), not the whole model moved to --device: the same numbers, dense and pruned."""
    records = [run(Job(model=str(llama_dir), prune=PruneConfig("wanda", "unstructured", 0.5),
                       calibration=CalibrationConfig(str(text_file), 4, 32), evaluation=EvalConfig(None),
                       tasks=TasksConfig((TASK,), include=str(task_dir), limit=12), device="cpu", device_map=spec))
               for spec in (None, "cpu=1GiB")]
    assert records[0]["tasks"]["pruned"]["results"] == records[1]["tasks"]["pruned"]["results"]
    assert records[0]["tasks"]["dense"]["results"] == records[1]["tasks"]["dense"]["results"]


def test_eval_subcommand_runs_tasks_and_perplexity(llama_dir, text_file, task_dir, tmp_path, capsys):
    from llmprune.cli.commands import main

    argv = ["eval", str(llama_dir), "--tasks", TASK, "--tasks-include", str(task_dir), "--limit", "8",
            "--ppl", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--device", "cpu",
            "--json", str(tmp_path / "r.json"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["tasks"]["n_samples"][TASK] == 8 and record["ppl"] > 1
    assert TASK in printed and "acc" in printed


def test_unknown_task_fails_before_any_work(llama_dir, task_dir):
    with pytest.raises(LlmpruneError, match="unknown lm-eval task 'llmprune_wiki_mcq'; did you mean"):
        run(Job(model=str(llama_dir), tasks=TasksConfig(("llmprune_wiki_mcq",), include=str(task_dir))))


def test_prune_cli_with_eval_tasks_prints_dense_and_pruned(llama_dir, text_file, task_dir, tmp_path, capsys):
    from llmprune.cli.commands import main

    argv = ["--model", str(llama_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval", "none", "--device", "cpu", "--out", str(tmp_path / "o"), "--eval-tasks", TASK,
            "--tasks-include", str(task_dir), "--tasks-limit", "6", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("task"))
    assert "dense" in header and "pruned" in header
    record = json.loads((tmp_path / "o" / "llmprune.json").read_text())
    assert record["tasks"]["dense"]["n_samples"][TASK] == 6 and record["tasks"]["pruned"]["limit"] == 6


def test_tasks_with_an_unreachable_dataset_fail_before_any_work(llama_dir, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    text = (DATA / "wiki_mc.yaml").read_text().replace("DATA_FILE", str(tmp_path / "missing.jsonl"))
    (folder / "wiki_mc.yaml").write_text(text)
    with pytest.raises(LlmpruneError, match="cannot load the data"):
        run(Job(model=str(llama_dir), tasks=TasksConfig((TASK,), include=str(folder)), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
