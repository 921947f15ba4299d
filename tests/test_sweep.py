"""Sweeps: a grid of runs on one model, reused dense weights and layer-0 inputs, resumable,
with a table and a PNG plot."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.errors import Cancelled, LlmpruneError
from llmprune.jobs.pipeline import EvalConfig, Job, run
from llmprune.jobs.sweep import SweepConfig, run_sweep


def sweep_config(model: Path, text: Path, **kwargs) -> SweepConfig:
    return SweepConfig(model=str(model), methods=("magnitude", "wanda"), sparsities=(0.3, 0.5), patterns=("2:4",),
                       calibration=CalibrationConfig(str(text), 4, 32), evaluation=EvalConfig(str(text), 32, 2),
                       device="cpu", **kwargs)


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG, after checking its signature and every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos, found = {}, 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        found.append(kind)
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            chunks[key.decode()] = value.decode("latin-1")
        pos += 12 + length
    assert found[0] == b"IHDR" and found[-1] == b"IEND" and b"IDAT" in found
    return chunks


@pytest.fixture(scope="module")
def finished(tmp_path_factory, llama_dir, text_file):
    out = tmp_path_factory.mktemp("sweep") / "s"
    return out, run_sweep(sweep_config(llama_dir, text_file), out)


def test_sweep_writes_table_csv_and_plot(finished):
    out, record = finished
    keys = [p["key"] for p in record["points"]]
    assert keys == ["magnitude unstructured 0.3", "magnitude unstructured 0.5", "magnitude 2:4 0.5",
                    "wanda unstructured 0.3", "wanda unstructured 0.5", "wanda 2:4 0.5"]
    assert json.loads((out / "sweep.json").read_text())["points"] == record["points"]
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("method,pattern,sparsity_target") and len(rows) == 1 + 1 + 6
    series = json.loads(png_text(out / "sweep.png")["Description"])
    assert set(series) == {"magnitude", "magnitude 2:4", "wanda", "wanda 2:4"}
    assert [x for x, _ in series["wanda"]] == [0.3, 0.5] and len(series["wanda 2:4"]) == 1
    for point in record["points"]:
        assert point["sparsity_achieved"] == pytest.approx(point["sparsity_target"], abs=0.01)


def test_sweep_points_equal_standalone_runs(finished, llama_dir, text_file):
    _, record = finished
    ppl = {p["key"]: p["ppl"] for p in record["points"]}
    for method, pattern, sparsity in (("wanda", "unstructured", 0.5), ("magnitude", "2:4", None)):
        alone = run(Job(model=str(llama_dir), prune=PruneConfig(method, pattern, sparsity),
                        calibration=CalibrationConfig(str(text_file), 4, 32),
                        evaluation=EvalConfig(str(text_file), 32, 2), device="cpu"))
        assert ppl[f"{method} {pattern} 0.5"] == alone["evaluation"]["ppl_pruned"]
        assert record["dense_ppl"] == alone["evaluation"]["ppl_dense"]


def test_a_sweep_with_generated_windows_equals_the_same_single_run(llama_dir, text_file, tmp_path):
    cal = CalibrationConfig(str(text_file), 4, 32, 0, 2)
    config = SweepConfig(model=str(llama_dir), methods=("wanda",), sparsities=(0.5,), patterns=(), calibration=cal,
                         evaluation=EvalConfig(str(text_file), 32, 2), device="cpu")
    record = run_sweep(config, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["setup"]["calibration"]["generated"] == 2
    alone = run(Job(model=str(llama_dir), prune=PruneConfig("wanda", "unstructured", 0.5), calibration=cal,
                    evaluation=EvalConfig(str(text_file), 32, 2), device="cpu"))
    assert alone["calibration"]["generated"] == 2
    assert record["points"][0]["ppl"] == alone["evaluation"]["ppl_pruned"]
    real = run(Job(model=str(llama_dir), prune=PruneConfig("wanda", "unstructured", 0.5),
                   calibration=CalibrationConfig(str(text_file), 4, 32), evaluation=EvalConfig(str(text_file), 32, 2),
                   device="cpu"))
    assert real["evaluation"]["ppl_pruned"] != alone["evaluation"]["ppl_pruned"]  # the windows mattered


def test_interrupted_sweep_resumes_with_the_same_results(finished, llama_dir, text_file, tmp_path):
    _, complete = finished
    out = tmp_path / "s"
    seen: list[str] = []

    def stop_after_two() -> bool:
        return len(seen) >= 2

    with pytest.raises(Cancelled):
        run_sweep(sweep_config(llama_dir, text_file), out, progress=lambda event: seen.append(event.stage),
                  cancel=stop_after_two)
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 2
    rest: list[str] = []
    resumed = run_sweep(sweep_config(llama_dir, text_file), out, progress=lambda event: rest.append(event.stage))
    assert len(rest) == 4 and not set(rest) & set(seen)
    assert [(p["key"], p["ppl"]) for p in resumed["points"]] == [(p["key"], p["ppl"]) for p in complete["points"]]
    with pytest.raises(LlmpruneError, match="another setup"):
        run_sweep(sweep_config(llama_dir, text_file, dtype="bfloat16"), out)


def test_sweep_cli_prints_the_table(llama_dir, text_file, tmp_path, capsys):
    from llmprune.cli.commands import main

    argv = ["sweep", "--model", str(llama_dir), "--methods", "wanda", "--sparsities", "0.5", "--patterns", "",
            "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--eval", str(text_file),
            "--eval-seqlen", "32", "--eval-windows", "2", "--device", "cpu", "--out", str(tmp_path / "s"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "wanda" in printed and "sweep.png" in printed
    assert main([*argv[:-3], "--sparsities", "0.5,2", "--out", str(tmp_path / "t")]) == 2
