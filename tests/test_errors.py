"""Every input the user can get wrong ends with exit code 2, one line on stderr that starts with
"llmprune: error:", no traceback, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

from llmprune.cli.commands import main
from llmprune.core.factor import inverse_hessian_factor
from llmprune.engine.config import PruneConfig
from llmprune.engine.driver import prune
from llmprune.errors import LlmpruneError

CLI = str(Path(sys.executable).with_name("llmprune"))
FAST = ["--nsamples", "2", "--seqlen", "16", "--eval", "none", "--threads", "1", "--quiet"]


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones included) with its content, to show that a run
    wrote, renamed or removed nothing."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def error_line(code: int, stderr: str, stdout: str) -> str:
    """Check a failed run's form and return its message. Other lines on stderr (transformers'
    own weight-loading bar) may precede it; the message itself is the single last line."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    assert [line for line in lines if line.startswith("llmprune:")] == [lines[-1]], stderr
    assert lines[-1].startswith("llmprune: error: ")
    assert stdout == ""
    return lines[-1]


def refused(argv: list[str], folder: Path, capsys) -> str:
    """Run the CLI in-process; check the failure's form and that nothing was written."""
    capsys.readouterr()  # drop what the test's own setup printed
    before = listing(folder)
    code = main(argv)
    captured = capsys.readouterr()
    message = error_line(code, captured.err, captured.out)
    assert listing(folder) == before, "a failed run changed the folder"
    return message


def refused_in_subprocess(argv: list[str], folder: Path, **env: str) -> str:
    """The same through the installed console script, where a traceback would really show."""
    before = listing(folder)
    done = subprocess.run([CLI, *argv], cwd=folder, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    message = error_line(done.returncode, done.stderr, done.stdout)
    # These fail before a model is loaded, so nothing else may be on stderr.
    assert done.stderr.splitlines() == [message]
    assert listing(folder) == before
    return message


def outputs(folder: Path) -> list[str]:
    return ["--out", str(folder / "out"), "--json", str(folder / "record.json")]


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "expected"), [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity=-0.1"], "sparsity must be in [0, 1)"),
    (["--sparsity", "nan"], "sparsity must be in [0, 1)"),
    (["--pattern", "2-4"], "not 'unstructured' or 'N:M'"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "0:4"], "0 < N < M"),
    (["--sparsity", "0.6", "--pattern", "2:4"], "contradicts sparsity 0.6"),
    (["--method", "obs"], "unknown method 'obs'"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--eval-windows", "-1"], "eval windows must be >= 0"),
    (["--shrink", "1.5"], "shrink must be in [0, 1]"),
])
def test_bad_options(options, expected, llama_dir, text_file, tmp_path, capsys):
    message = refused(["--model", str(llama_dir), *options, "--calib", str(text_file), *FAST,
                       *outputs(tmp_path)], tmp_path, capsys)
    assert expected in message


def test_missing_cuda_device(llama_dir, text_file, tmp_path, capsys):
    # cuda:99 exists nowhere: "not available" on a CPU machine, "does not exist" on a GPU one.
    message = refused(["--model", str(llama_dir), "--device", "cuda:99", "--calib", str(text_file), *FAST,
                       *outputs(tmp_path)], tmp_path, capsys)
    assert "CUDA is not available" in message or "does not exist" in message


# --- model ---------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path):
    message = refused_in_subprocess(["--model", "./does-not-exist", *FAST, "--out", "out"], tmp_path)
    assert "does-not-exist" in message and "does not exist" in message


def test_unknown_hub_model_offline(tmp_path):
    message = refused_in_subprocess(
        ["--model", "nonexistent-org/nonexistent-model-xyz", *FAST, "--out", "out"], tmp_path,
        HF_HUB_OFFLINE="1",
    )
    assert "nonexistent-org/nonexistent-model-xyz" in message


def test_pattern_not_dividing_a_width_names_the_layer(awkward_dir, text_file, tmp_path, capsys):
    message = refused(["--model", str(awkward_dir), "--pattern", "4:8", "--calib", str(text_file), *FAST,
                       *outputs(tmp_path)], tmp_path, capsys)
    assert "model.layers.0.mlp.down_proj" in message
    assert "100" in message and "8" in message


def test_width_check_comes_before_any_pruning():
    model = tiny.awkward_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LlmpruneError, match=r"mlp\.down_proj"):
        prune(model, PruneConfig(method="magnitude", pattern="4:8"), tiny.random_ids(2, 16), device="cpu")
    # q/k/v come before down_proj in every layer: none of them may have been pruned already.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # 100 is divisible by 4, so 2:4 is fine on the same model.
    report = prune(model, PruneConfig(method="magnitude", pattern="2:4"), tiny.random_ids(2, 16),
                   device="cpu")
    assert report.sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("where", ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"])
def test_nan_weight(tokenizer, text_file, tmp_path, capsys, where):
    """A damaged decoder layer is found when the loop reaches it, anything else before any work;
    either way nothing is written."""
    model = tiny.llama(len(tokenizer))
    with torch.no_grad():
        model.get_parameter(where)[3, 5] = float("nan")
    folder = tmp_path / "damaged"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    message = refused(["--model", str(folder), "--calib", str(text_file), *FAST, *outputs(tmp_path)],
                      tmp_path, capsys)
    assert where in message
    assert "NaN" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_is_finite_finds_one_bad_element_in_any_chunk(dtype, monkeypatch):
    """The check sums chunk by chunk (no fp32 copy of a whole fp16 weight); against the naive
    element-wise test, for a bad element in every chunk position, and a chunk whose sum alone
    overflows but whose elements are all finite."""
    import llmprune.engine.model as adapter

    monkeypatch.setattr(adapter, "FINITE_CHUNK", 7)
    base = torch.linspace(-1, 1, 50, dtype=dtype).reshape(5, 10)
    assert adapter.is_finite(base)
    for index in range(base.numel()):
        for bad in (float("nan"), float("inf"), -float("inf")):
            damaged = base.clone()
            damaged.view(-1)[index] = bad
            assert adapter.is_finite(damaged) == bool(torch.isfinite(damaged).all()) is False
    huge = torch.full((5, 10), torch.finfo(dtype).max, dtype=dtype)
    assert adapter.is_finite(huge)  # every element finite, though an fp32 sum of them may not be


# --- data ----------------------------------------------------------------------------------


def test_calibration_text_shorter_than_one_sequence(llama_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    message = refused(["--model", str(llama_dir), "--calib", str(short), *FAST, *outputs(tmp_path)],
                      tmp_path, capsys)
    assert "fewer than one sequence" in message


def test_unknown_calibration_source(llama_dir, tmp_path, capsys):
    message = refused(["--model", str(llama_dir), "--calib", "wikitext3", *FAST, *outputs(tmp_path)],
                      tmp_path, capsys)
    assert "unknown text source 'wikitext3'" in message


def test_missing_calibration_file(llama_dir, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    message = refused(["--model", str(llama_dir), "--calib", str(missing), *FAST, *outputs(tmp_path)],
                      tmp_path, capsys)
    assert str(missing) in message and "does not exist" in message


# --- output --------------------------------------------------------------------------------


def test_existing_out_is_left_untouched(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier checkpoint")
    message = refused(["--model", str(llama_dir), "--calib", str(text_file), *FAST, *outputs(tmp_path)],
                      tmp_path, capsys)
    assert "already exists" in message and "--overwrite" in message


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_out(where, llama_dir, text_file, tmp_path, capsys):
    if where == "proc":
        out = "/proc/llmprune-test/x"  # no one, root included, can make a folder in /proc
    else:
        (tmp_path / "file.txt").write_text("a file, not a folder")
        out = str(tmp_path / "file.txt" / "x")
    message = refused(["--model", str(llama_dir), "--calib", str(text_file), *FAST, "--out", out],
                      tmp_path, capsys)
    assert "cannot write" in message
    assert not Path("/proc/llmprune-test").exists()


# --- numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize("H", [torch.full((8, 8), float("nan")), -torch.eye(8)], ids=["nan", "negative"])
def test_singular_hessian_stops_with_an_error(H):
    with pytest.raises(LlmpruneError, match="singular"):
        inverse_hessian_factor(H, 0.01)


def test_positive_definite_hessian_is_factored():
    # The counterpart of the test above: U is upper triangular with UᵀU = (H + λI)⁻¹.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=gen)
    H = 2 * X.T @ X / 64
    U, damp = inverse_hessian_factor(H, 0.01)
    damped = H + torch.eye(8) * 0.01 * H.diagonal().mean()
    assert damp == 0.01
    assert torch.equal(U, U.triu())
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), atol=1e-5)
