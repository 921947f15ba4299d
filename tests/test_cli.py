"""End-to-end runs of the command line on a tiny Llama folder with the tiny tokenizer."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import tiny
import torch

from llmprune.cli.commands import main
from llmprune.errors import LlmpruneError
from llmprune.io.export import save_checkpoint

SMALL = ["--nsamples", "4", "--seqlen", "32", "--threads", "1", "--quiet"]


def hidden_leftovers(folder: Path) -> list[str]:
    """Staging or replaced folders that publishing must clean up."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, llama_dir, text_file):
    """One full run: SparseGPT 2:4, with perplexity before and after, saved and recorded."""
    work = tmp_path_factory.mktemp("run")
    out, record = work / "out", work / "record.json"
    argv = ["--model", str(llama_dir), "--method", "sparsegpt", "--pattern", "2:4", *SMALL,
            "--calib", str(text_file), "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2",
            "--out", str(out), "--json", str(record)]
    # Module-scoped fixtures cannot use capsys; the table goes to stdout.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return {"code": code, "stdout": printed.getvalue(), "out": out, "record": record, "work": work}


def test_prune_run_succeeds_and_prints_the_table(pruned_run):
    assert pruned_run["code"] == 0
    table = pruned_run["stdout"]
    dense = re.search(r"^ppl dense\s+([0-9.]+)$", table, re.M)
    pruned = re.search(r"^ppl pruned\s+([0-9.]+)$", table, re.M)
    assert dense and pruned, table
    record = json.loads(pruned_run["record"].read_text())
    assert float(dense.group(1)) == pytest.approx(record["evaluation"]["ppl_dense"], abs=5e-4)
    assert float(pruned.group(1)) == pytest.approx(record["evaluation"]["ppl_pruned"], abs=5e-4)
    assert "sparsegpt 2:4" in table


def test_prune_run_writes_a_record(pruned_run, text_file):
    record = json.loads(pruned_run["record"].read_text())
    assert record["sparsity_achieved"] == pytest.approx(0.5, abs=1e-6)
    assert record["method"] == "sparsegpt" and record["pattern"] == "2:4"
    assert record["resolved_options"]["shrink"] == 0.1 and record["config"]["shrink"] == 0.1
    assert record["calibration"]["samples"] == 4 and record["calibration"]["seqlen"] == 32
    assert record["evaluation"]["windows"] == 2 and record["evaluation"]["seqlen"] == 32
    assert len(record["layers"]) == tiny.LAYERS * 7  # q k v o gate up down per layer
    # The side file in the checkpoint holds the same facts as --json.
    saved = json.loads((pruned_run["out"] / "llmprune.json").read_text())
    assert saved["evaluation"] == record["evaluation"]
    assert saved["layers"] == record["layers"]
    card = (pruned_run["out"] / "README.md").read_text()
    assert "shrink: 0.1" in card  # the model card says it too
    assert "conjugate-gradient" not in card  # the OBS update alone: no refit steps to report


def test_prune_run_output_loads_in_stock_transformers(pruned_run, llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pruned_run["out"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size
    for name, linear in tiny.decoder_linears(model, "model.layers").items():
        W = linear.weight.detach()
        assert (W != 0).reshape(W.shape[0], -1, 4).sum(-1).max() <= 2, name
    # Everything outside the decoder linears is the dense model's.
    pruned_names = {f"{n}.weight" for n in tiny.decoder_linears(model, "model.layers")}
    dense_params = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if name not in pruned_names:
            assert torch.equal(param, dense_params[name]), name
    assert "sparsity_config" not in json.loads((out / "config.json").read_text())
    assert (out / "README.md").read_text().count("model.layers.") == tiny.LAYERS * 7
    assert hidden_leftovers(pruned_run["work"]) == []


def test_eval_subcommand_reproduces_the_recorded_perplexity(pruned_run, text_file, tmp_path, capsys):
    result = tmp_path / "eval.json"
    code = main(["eval", str(pruned_run["out"]), "--eval", str(text_file), "--eval-seqlen", "32",
                 "--eval-windows", "2", "--threads", "1", "--quiet", "--json", str(result)])
    assert code == 0
    recorded = json.loads((pruned_run["out"] / "llmprune.json").read_text())["evaluation"]["ppl_pruned"]
    printed = capsys.readouterr().out
    assert f"{recorded:.3f}" in printed, printed
    assert json.loads(result.read_text())["ppl"] == pytest.approx(recorded, rel=1e-6)


def test_threads_last_one_command_when_main_runs_in_process(llama_dir, text_file, tmp_path):
    """--threads sets torch's thread count for the whole process; called from Python (a notebook,
    these tests), main() puts it back afterwards, or every later computation runs on one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["--model", str(llama_dir), "--method", "magnitude", "--sparsity", "0.5", *SMALL,
                     "--calib", str(text_file), "--eval", "none", "--json", str(tmp_path / "r.json")]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_jsonl_calibration(llama_dir, text_file, tmp_path, capsys):
    paragraphs = [p for p in text_file.read_text().split("\n\n") if p.strip()][:300]
    calib = tmp_path / "calib.jsonl"
    # Both accepted line forms: an object with "text", and a bare JSON string.
    lines = [json.dumps({"text": p}) if i % 2 else json.dumps(p) for i, p in enumerate(paragraphs)]
    calib.write_text("\n".join(lines) + "\n")
    record = tmp_path / "r.json"
    code = main(["--model", str(llama_dir), "--method", "wanda", "--sparsity", "0.5", *SMALL,
                 "--calib", str(calib), "--eval", "none", "--json", str(record)])
    assert code == 0, capsys.readouterr().err
    saved = json.loads(record.read_text())
    assert saved["calibration"]["source"] == str(calib)
    assert saved["calibration"]["tokens"] == 4 * 32
    assert saved["sparsity_achieved"] == pytest.approx(0.5, abs=1e-6)
    assert saved["evaluation"] is None


def test_overwrite_replaces_an_earlier_output(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(llama_dir), "--method", "magnitude", *SMALL, "--calib", str(text_file),
            "--eval", "none", "--out", str(out)]
    assert main([*argv, "--pattern", "2:4"]) == 0
    assert json.loads((out / "llmprune.json").read_text())["pattern"] == "2:4"
    assert main([*argv, "--pattern", "4:8", "--overwrite"]) == 0
    record = json.loads((out / "llmprune.json").read_text())
    assert record["pattern"] == "4:8"
    assert sorted(p.name for p in out.iterdir()) == record["files"]
    assert (out / "config.json").exists()
    assert hidden_leftovers(tmp_path) == []


def test_existing_out_is_refused_before_any_work(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    import llmprune.jobs.stores

    loads = []

    def spy(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the model was loaded although --out exists")

    monkeypatch.setattr(llmprune.jobs.stores, "load", spy)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    code = main(["--model", str(llama_dir), "--method", "magnitude", "--pattern", "2:4", *SMALL,
                 "--calib", str(text_file), "--eval", "none", "--out", str(out)])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert loads == []
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "previous run"
    assert hidden_leftovers(tmp_path) == []


class BrokenModel:
    """Fails half-way through writing, as a full disk (OSError) or Ctrl-C would."""

    def __init__(self, error: type[BaseException] = OSError) -> None:
        self.error = error

    def save_pretrained(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise self.error("stopped")


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failed_save_leaves_nothing_behind(tmp_path, error):
    with pytest.raises(error):
        save_checkpoint(BrokenModel(error), None, tmp_path / "out", {}, "card")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "llmprune.json").write_text(json.dumps({"llmprune_version": "0", "files": ["llmprune.json", "old.txt"]}))
    (out / "old.txt").write_text("previous run")
    with pytest.raises(OSError):
        save_checkpoint(BrokenModel(), None, out, {}, "card", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["llmprune.json", "old.txt"]


def test_save_refuses_existing_folder_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LlmpruneError, match="already exists"):
        save_checkpoint(BrokenModel(), None, out, {}, "card")
    assert list(out.iterdir()) == []
    assert hidden_leftovers(tmp_path) == []


def test_quiet_run_shows_no_progress_bars(llama_dir, text_file, tmp_path, capsys):
    # --quiet promises no progress bars; that includes the ones of the libraries llmprune drives.
    capsys.readouterr()
    code = main(["--model", str(llama_dir), "--method", "magnitude", *SMALL, "--calib", str(text_file),
                 "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0
    assert "it/s]" not in err and "%|" not in err, err


def test_progress_bars_without_quiet(llama_dir, text_file, tmp_path, capsys):
    # The counterpart: without --quiet the pruning bar counts decoder layers.
    capsys.readouterr()
    code = main(["--model", str(llama_dir), "--method", "magnitude", "--nsamples", "4", "--seqlen", "32",
                 "--threads", "1", "--calib", str(text_file), "--eval", "none"])
    err = capsys.readouterr().err
    assert code == 0
    assert f"prune: 100%|██████████| {tiny.LAYERS}/{tiny.LAYERS}" in err, err


@pytest.mark.parametrize("pattern,amount", [("heads", ["--sparsity", "0.5"]), ("structured", ["--params", "0.3"]),
                                            ("layers", ["--sparsity", "0.5"]),
                                            ("structured", ["--params", "0.6", "--drop-layers", "1"])])
def test_structured_run_writes_a_smaller_stock_checkpoint(llama_dir, text_file, tmp_path, capsys, pattern, amount):
    from transformers import AutoModelForCausalLM

    out, record_path = tmp_path / "out", tmp_path / "record.json"
    argv = ["--model", str(llama_dir), "--pattern", pattern, *amount, *SMALL, "--calib", str(text_file),
            "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--decode-tokens", "4",
            "--out", str(out), "--json", str(record_path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "decode speed" in table and "ppl pruned" in table and "parameters" in table
    record = json.loads(record_path.read_text())
    method = "block-influence" if pattern == "layers" else "obs"  # layers are ranked by block influence
    assert record["kind"] == "structured" and record["method"] == method and record["pattern"] == pattern
    if pattern == "layers":
        assert len(record["dropped_layers"]) == 1 and f"layer {record['dropped_layers'][0]}" in (
            out / "README.md").read_text()
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert record["weights_bytes"]["after"] < record["weights_bytes"]["before"]
    assert record["decode_speed"]["tokens_per_s_dense"] > 0 and record["decode_speed"]["speedup"] > 0
    assert record["checkpoint_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    saved = json.loads((out / "llmprune.json").read_text())
    assert saved["checkpoint_bytes"] == record["checkpoint_bytes"]
    card = (out / "README.md").read_text()
    assert "decode speed" in card and "safetensors on disk" in card and "perplexity" in card
    config = json.loads((out / "config.json").read_text())
    if pattern == "heads":
        assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 2
    if pattern == "layers" or "--drop-layers" in amount:
        assert config["num_hidden_layers"] == 1
    if "--drop-layers" in amount:
        assert record["config"]["drop_layers"] == 1
        assert record["parameters"]["decoder_layer_fraction_removed"] == pytest.approx(0.6, abs=0.02)
        assert "depth: 1 layer dropped first" in table and "Depth: 1 of 2 decoder layers" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]["after"]


@pytest.mark.parametrize("argv,message", [
    (["--pattern", "heads"], "needs sparsity (--sparsity)"),
    (["--pattern", "structured", "--sparsity", "0.2"], "needs params (--params)"),
    (["--pattern", "heads", "--sparsity", "0.9"], "would leave no heads"),
    (["--pattern", "channels", "--sparsity", "0.3", "--method", "wanda"], "unknown structured score"),
    (["--pattern", "2:4", "--params", "0.2"], "--params applies to --pattern structured"),
    (["--pattern", "structured", "--params", "0.3", "--drop-layers", "1"], "more than params 30% (--params)"),
    (["--pattern", "heads", "--sparsity", "0.5", "--drop-layers", "1"], "applies to pattern structured"),
    (["--pattern", "2:4", "--drop-layers", "1"], "--drop-layers applies to --pattern structured"),
    (["--pattern", "2:4", "--no-bridge"], "--bridge applies to --pattern structured"),
])
def test_structured_bad_input_is_one_line_and_writes_nothing(llama_dir, text_file, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = main(["--model", str(llama_dir), *argv, *SMALL, "--calib", str(text_file), "--eval", "none",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and hidden_leftovers(tmp_path) == []
