"""Nothing lost, nothing false: what --overwrite may replace, the output lock, damaged or foreign
checkpoints, failures after the work, signals, and figures that cover what they claim.

Each case goes through the CLI where a user meets it; each failed on the code before the fix."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import tiny
import torch
from test_errors import CLI, FAST, error_line, listing, refused, refused_in_subprocess

from llmprune.cli.commands import main
from llmprune.errors import LlmpruneError
from llmprune.io.export import OutputLock

SMALL = ["--nsamples", "2", "--seqlen", "16", "--threads", "1", "--quiet"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def prune_argv(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--calib", str(text), *FAST, "--method", "magnitude", "--out", str(out), *extra]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- 1. what --overwrite may replace --------------------------------------------------------------


def test_overwrite_refuses_the_working_folder(llama_dir, text_file, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    message = refused(prune_argv(llama_dir, text_file, Path("."), "--overwrite"), tmp_path, capsys)
    assert "working folder" in message
    message = refused(prune_argv(llama_dir, text_file, tmp_path, "--overwrite"), tmp_path, capsys)
    assert "working folder" in message  # a folder above it too
    assert (work / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_models_own_folder(llama_dir, text_file, tmp_path, capsys):
    model = copy_model(llama_dir, tmp_path / "model")
    message = refused(prune_argv(model, text_file, model, "--overwrite"), tmp_path, capsys)
    assert "which this run reads" in message
    message = refused(prune_argv(model, text_file, tmp_path, "--overwrite"), tmp_path, capsys)
    assert "which this run reads" in message or "working folder" in message


def test_overwrite_refuses_a_folder_llmprune_did_not_write(llama_dir, text_file, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    message = refused(prune_argv(llama_dir, text_file, precious, "--overwrite"), tmp_path, capsys)
    assert "not an llmprune output" in message
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_an_output_holding_other_files(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(prune_argv(llama_dir, text_file, out), capsys)[0] == 0
    (out / "my-eval-results.csv").write_text("keep me")
    message = refused(prune_argv(llama_dir, text_file, out, "--overwrite"), tmp_path, capsys)
    assert "my-eval-results.csv" in message and "did not write" in message


def test_overwrite_replaces_an_empty_folder(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, _ = run(prune_argv(llama_dir, text_file, out, "--overwrite"), capsys)
    assert code == 0 and (out / "llmprune.json").is_file()
    assert f"saved to  {out}" in stdout or str(out) in stdout


@pytest.mark.parametrize(("umask", "file", "folder"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_saved_files_follow_the_umask(llama_dir, text_file, tmp_path, capsys, umask, file, folder):
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        assert run(prune_argv(llama_dir, text_file, out), capsys)[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == file, modes
    assert set(modes.values()) == {file}
    assert out.stat().st_mode & 0o777 == folder


def test_overwrite_refuses_an_old_output_holding_a_users_file(llama_dir, text_file, tmp_path, capsys):
    """An output written before records listed their files: only the names llmprune wrote count."""
    out = tmp_path / "out"
    assert run(prune_argv(llama_dir, text_file, out), capsys)[0] == 0
    record = json.loads((out / "llmprune.json").read_text())
    del record["files"]
    (out / "llmprune.json").write_text(json.dumps(record))
    (out / "results.json").write_text("{}")
    message = refused(prune_argv(llama_dir, text_file, out, "--overwrite"), tmp_path, capsys)
    assert "results.json" in message
    (out / "results.json").unlink()
    assert run(prune_argv(llama_dir, text_file, out, "--overwrite"), capsys)[0] == 0


# --- 2. one output, one run -------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--stream", "on", "--overwrite"],
                                   ["--stream", "on", "--resume"]])
def test_an_output_being_written_is_refused_whatever_the_flags(llama_dir, text_file, tmp_path, capsys, flags):
    out = tmp_path / "out"
    with OutputLock(out):  # as a live run holds it
        before = listing(tmp_path)
        code, stdout, err = run(prune_argv(llama_dir, text_file, out, *flags), capsys)
        assert "being written by another llmprune run" in error_line(code, err, stdout)
        assert listing(tmp_path) == before
    assert not out.exists()
    assert run(prune_argv(llama_dir, text_file, out), capsys)[0] == 0  # released: the next run may go


def test_a_second_run_on_a_live_output_is_refused_and_the_first_is_intact(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    first = [CLI, "--model", str(llama_dir), "--calib", str(text_file), "--nsamples", "64", "--seqlen", "64",
             "--eval", "none", "--threads", "1", "--quiet", "--method", "sparsegpt", "--stream", "on",
             "--seed", "0", "--out", str(out)]
    proc = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lock = tmp_path / ".out.lock"
    deadline = time.monotonic() + 120
    while not (tmp_path / ".out.partial").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the first run ended before the second could start"
    assert lock.exists()
    code, stdout, err = run(prune_argv(llama_dir, text_file, out, "--overwrite", "--stream", "on", "--seed", "1"),
                            capsys)
    assert "being written by another llmprune run" in error_line(code, err, stdout)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    record = json.loads((out / "llmprune.json").read_text())
    assert record["calibration"]["seed"] == 0 and record["method"] == "sparsegpt"
    assert sorted(p.name for p in out.iterdir()) == record["files"]
    assert hidden(tmp_path) == []  # neither a staging folder nor the lock file is left


# --- 3. missing or unexpected tensors -------------------------------------------------------------


def _edit_weights(src: Path, dst: Path, drop: str | None = None, add: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    copy_model(src, dst)
    tensors = load_file(dst / "model.safetensors")
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(2, 2)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("stream", ["off", "on"])
@pytest.mark.parametrize(("drop", "add", "expected"), [
    ("model.layers.1.mlp.down_proj.weight", None, "model.layers.1.mlp.down_proj.weight missing from"),
    (None, "model.layers.0.mlp.extra.weight", "model.layers.0.mlp.extra.weight unexpected in"),
])
def test_missing_or_unexpected_weights_stop_the_run(llama_dir, text_file, tmp_path, capsys, stream, drop, add,
                                                     expected):
    model = _edit_weights(llama_dir, tmp_path / "model", drop, add)
    message = refused(prune_argv(model, text_file, tmp_path / "out", "--stream", stream), tmp_path, capsys)
    assert expected in message


def test_shapes_that_do_not_match_the_config_stop_the_run(llama_dir, text_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = copy_model(llama_dir, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-8].contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    for stream in ("off", "on"):
        message = refused(prune_argv(model, text_file, tmp_path / "out", "--stream", stream), tmp_path, capsys)
        assert "wrong shape" in message or f"weight {name} has shape" in message


def test_streaming_accepts_buffers_older_checkpoints_saved(llama_dir, text_file, tmp_path, capsys):
    """transformers ignores a saved rotary inv_freq (a buffer the model makes itself); so does streaming."""
    model = _edit_weights(llama_dir, tmp_path / "model")
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert run(prune_argv(model, text_file, tmp_path / "out", "--stream", "on"), capsys)[0] == 0


def test_json_inside_out_is_refused(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    message = refused([*prune_argv(llama_dir, text_file, out), "--json", str(out / "record.json")], tmp_path, capsys)
    assert "inside --out" in message


def test_a_proxy_is_left_to_decide(monkeypatch):
    from llmprune.io.hub import hub_unreachable

    endpoint = f"http://127.0.0.1:{closed_port()}"
    assert hub_unreachable(endpoint) is not None
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("no_proxy", "")
    assert hub_unreachable(endpoint) is None


def test_causal_checks():
    from llmprune.io.loading import check_causal

    check_causal({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "g")
    check_causal({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "l")
    for config in ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, {"model_type": "roberta"},
                   {"model_type": "t5", "is_encoder_decoder": True, "architectures": ["T5ForConditionalGeneration"]}):
        with pytest.raises(LlmpruneError, match="not a causal language model"):
            check_causal(config, "x")


# --- 4. a failure after the work keeps the work's record -------------------------------------------


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:{port}"}])
def test_a_failed_push_keeps_the_checkpoint_the_summary_and_the_json(llama_dir, text_file, tmp_path, env):
    out, record = tmp_path / "out", tmp_path / "record.json"
    env = {k: v.format(port=closed_port()) for k, v in env.items()}
    done = subprocess.run([CLI, *prune_argv(llama_dir, text_file, out, "--push-to-hub", "me/tiny", "--json",
                                            str(record))],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_TOKEN": "hf_x", **env})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("llmprune: error: push to me/tiny failed") and "cannot reach" in last
    assert f"the checkpoint is saved in {out}" in last and f"llmprune push {out} --repo me/tiny" in last
    assert "saved to" in done.stdout and "sparsity" in done.stdout
    assert json.loads(record.read_text())["out"] == str(out)
    assert (out / "llmprune.json").is_file() and (out / "model.safetensors").is_file()


def test_push_reports_a_broken_connection_in_one_line(llama_dir, text_file, tmp_path, capsys):
    """The Hub answers the TCP connection, then drops it: huggingface_hub raises its HTTP
    client's error (not an OSError), which was a 70-line traceback."""
    from huggingface_hub import HfApi

    from llmprune.io.hub import push

    out = tmp_path / "out"
    assert run(prune_argv(llama_dir, text_file, out), capsys)[0] == 0
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def drop_connections() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=drop_connections, daemon=True)
    thread.start()
    try:
        api = HfApi(endpoint=f"http://127.0.0.1:{server.getsockname()[1]}", token="hf_x")
        with pytest.raises(LlmpruneError, match="push to me/tiny failed: cannot reach the Hugging Face Hub"):
            push(out, "me/tiny", api=api)
    finally:
        stop.set()
        thread.join(5)
        server.close()


# --- 5. signals, and runs that fail before their work ---------------------------------------------


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import transformers
    original = transformers.PreTrainedModel.save_pretrained
    def slow(self, folder, **kwargs):
        original(self, folder, **kwargs)
        print("SAVING", flush=True)
        time.sleep(60)
    transformers.PreTrainedModel.save_pretrained = slow
    from llmprune.cli.commands import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_while_writing_leaves_nothing(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *prune_argv(llama_dir, text_file, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "SAVING"  # the shards are written, the folder not yet published
    assert [n for n in hidden(tmp_path) if ".partial-" in n]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "Traceback" not in stderr and stderr.splitlines()[-1].startswith("llmprune: terminated (SIGTERM)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no lock, no output


def test_streaming_run_failing_before_its_first_layer_leaves_no_partial(tokenizer, text_file, tmp_path, capsys):
    model = tiny.llama(len(tokenizer))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    message = refused(prune_argv(folder, text_file, out, "--stream", "on"), tmp_path, capsys)
    assert "NaN" in message
    message = refused(prune_argv(folder, text_file, out, "--stream", "on"), tmp_path, capsys)
    assert "NaN" in message and "--resume" not in message  # no interrupted run demands a resume


# --- 6. --json -------------------------------------------------------------------------------------


def test_unwritable_json_is_refused_before_any_work(llama_dir, text_file, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    message = refused([*prune_argv(llama_dir, text_file, tmp_path / "out"), "--json", str(blocker / "r.json")],
                      tmp_path, capsys)
    assert "cannot write to" in message
    message = refused([*prune_argv(llama_dir, text_file, tmp_path / "out"), "--json", str(tmp_path)],
                      tmp_path, capsys)
    assert "is a folder" in message


# --- 7. weights no method can prune stop the run; MoE checkpoints stored per expert do not stream ---


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory, tokenizer) -> Path:
    """LFM2's convolution layers hold a 3-D kernel (H, 1, K) in a decoder layer: neither a linear
    layer nor an expert container, so a weight no method prunes."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                        layer_types=["conv", "full_attention"])
    folder = tmp_path_factory.mktemp("models") / "lfm2"
    Lfm2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer) -> Path:
    import tiny

    folder = tmp_path_factory.mktemp("models") / "mixtral"
    tiny.mixtral(len(tokenizer)).save_pretrained(folder)  # transformers saves its experts one matrix each
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stream", ["off", "on"])
def test_unprunable_weights_stop_the_run_before_any_work(conv_dir, text_file, tmp_path, capsys, stream):
    message = refused(prune_argv(conv_dir, text_file, tmp_path / "out", "--stream", stream), tmp_path, capsys)
    assert "model.layers.0.conv.conv.weight" in message and "--allow-partial" in message


def test_allow_partial_reports_the_sparsity_of_all_decoder_weights(conv_dir, text_file, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    code, stdout, _ = run([*prune_argv(conv_dir, text_file, out, "--allow-partial"), "--sparsity", "0.5"],
                          capsys)
    assert code == 0
    record = json.loads((out / "llmprune.json").read_text())
    after = load_file(out / "model.safetensors")
    layer_weights = {k: v for k, v in after.items() if ".layers." in k and v.ndim >= 2}
    zeros = sum(int((v == 0).sum()) for v in layer_weights.values())
    total = sum(v.numel() for v in layer_weights.values())
    assert record["sparsity_achieved"] == pytest.approx(zeros / total, abs=1e-6)  # the kernel counts, dense
    assert record["sparsity_achieved"] < record["sparsity_of_pruned_linears"] == pytest.approx(0.5)
    assert record["unpruned_weights"] == ["model.layers.0.conv.conv.weight"]
    assert "left dense" in stdout and "not pruned" in (out / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    dense, pruned = (AutoModelForCausalLM.from_pretrained(f).state_dict() for f in (conv_dir, out))
    kernel = "model.layers.0.conv.conv.weight"
    assert torch.equal(dense[kernel], pruned[kernel])  # left as it was
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(dense[q], pruned[q])


def test_an_moe_model_prunes_its_experts_from_the_command_line(mixtral_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run([*prune_argv(mixtral_dir, text_file, out), "--sparsity", "0.5", "--pattern", "2:4"], capsys)
    assert code == 0
    record = json.loads((out / "llmprune.json").read_text())
    assert record["sparsity_achieved"] == pytest.approx(0.5, abs=0.01) and not record["unpruned_weights"]
    assert set(record["experts"]["containers"]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert "| experts | 2 MoE layers" in (out / "README.md").read_text()


def test_streaming_an_moe_checkpoint_that_lacks_one_experts_matrix_is_refused(mixtral_dir, text_file, tmp_path,
                                                                               capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(mixtral_dir, damaged)
    weights = load_file(damaged / "model.safetensors")
    gone = next(n for n in sorted(weights) if ".experts.3." in n and n.endswith(".w1.weight"))
    save_file({n: t for n, t in weights.items() if n != gone}, damaged / "model.safetensors", metadata={"format": "pt"})
    message = refused(prune_argv(damaged, text_file, tmp_path / "out", "--stream", "on"), tmp_path, capsys)
    assert "gate_up_proj" in message and "damaged" in message


def test_routers_are_not_pruned_and_experts_are_not_decoder_layers():
    from torch import nn
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from llmprune.engine.model import find_decoder_layers, find_linears

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        vocab_size=400, max_position_embeddings=128))
    linears = find_linears(model.model.layers[0])
    assert "mlp.shared_expert_gate" not in linears and "mlp.shared_expert.down_proj" in linears

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(4, 8)

    class Block(nn.Module):  # experts as a list of modules, longer than the stack of layers
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(4, 4)
            self.experts = nn.ModuleList(Expert() for _ in range(8))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    assert find_decoder_layers(Model())[0] == "layers"


# --- 8. what the run says about itself --------------------------------------------------------------


def test_a_masked_lm_is_refused(tokenizer, text_file, tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    message = refused(prune_argv(folder, text_file, tmp_path / "out"), tmp_path, capsys)
    assert "BertForMaskedLM, not a causal language model" in message
    message = refused(["eval", str(folder), "--eval", str(text_file)], tmp_path, capsys)
    assert "not a causal language model" in message


def test_same_text_for_calibration_and_evaluation_is_said(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(llama_dir), "--calib", str(text_file), *SMALL, "--method", "magnitude",
            "--eval", str(text_file), "--eval-seqlen", "16", "--eval-windows", "2", "--out", str(out)]
    code, stdout, err = run(argv, capsys)
    assert code == 0
    assert "calibration and evaluation use the same text" in err
    assert "the calibration text itself: not held out" in stdout
    record = json.loads((out / "llmprune.json").read_text())
    assert record["evaluation"]["same_text_as_calibration"] is True
    assert "not held out" in (out / "README.md").read_text()


def test_a_run_without_out_says_it_saves_nothing(llama_dir, text_file, capsys):
    code, stdout, err = run(["--model", str(llama_dir), "--calib", str(text_file), *FAST, "--method", "magnitude"],
                            capsys)
    assert code == 0
    assert "no output folder (--out) given" in err
    assert "saved to" in stdout and "nothing: no --out was given" in stdout


def test_the_card_names_no_undeclared_url_and_an_absolute_base_model(llama_dir, text_file, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(llama_dir.parent)
    out = tmp_path / "out"
    assert run(prune_argv(Path(llama_dir.name), text_file, out), capsys)[0] == 0
    card = (out / "README.md").read_text()
    assert "http" not in card
    assert json.loads((out / "llmprune.json").read_text())["base_model"] == str(llama_dir.resolve())
    assert f"# {llama_dir.resolve()}:" in card


# --- 10. tracebacks that become one line --------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
def test_non_utf8_text_is_one_line(llama_dir, tmp_path, capsys, flag):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("café " * 2000).encode("latin-1"))
    other = tmp_path / "ok.txt"
    other.write_text(tiny.pydoc_text())
    argv = ["--model", str(llama_dir), *SMALL, "--calib", str(other), "--eval", str(other), flag, str(latin)]
    message = refused(argv, tmp_path, capsys)
    assert "is not UTF-8 text" in message


def test_a_folder_given_as_a_text_file(llama_dir, tmp_path, capsys):
    message = refused(["--model", str(llama_dir), *FAST, "--calib", str(tmp_path)], tmp_path, capsys)
    assert "is a folder" in message


@pytest.mark.parametrize("damage", ["truncated", "random"])
@pytest.mark.parametrize("how", [["--stream", "off"], ["--stream", "on"], ["eval"]])
def test_damaged_safetensors_is_one_line(llama_dir, text_file, tmp_path, capsys, damage, how):
    model = copy_model(llama_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    if how == ["eval"]:
        argv = ["eval", str(model), "--eval", str(text_file), "--quiet"]
    else:
        argv = prune_argv(model, text_file, tmp_path / "out", *how)
    message = refused(argv, tmp_path, capsys)
    assert "model.safetensors is not a whole safetensors file" in message


def test_broken_config_and_missing_tokenizer(llama_dir, text_file, tmp_path, capsys):
    broken = copy_model(llama_dir, tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "llama",')
    message = refused(prune_argv(broken, text_file, tmp_path / "out"), tmp_path, capsys)
    assert "config.json is not valid JSON" in message
    bare = copy_model(llama_dir, tmp_path / "bare")
    for path in bare.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()
    message = refused(prune_argv(bare, text_file, tmp_path / "out"), tmp_path, capsys)
    assert "has no tokenizer" in message and "sentencepiece" not in message


@pytest.mark.parametrize(("options", "expected"), [
    (["--threads", "-2"], "--threads must be >= 0"),
    (["--batch-size", "-4"], "batch size must be >= 0"),
    (["--eval", "wikipedia", "--eval-batch-size", "0"], "eval batch size must be >= 1"),
    (["--device", "mps"], "no mps support"),
    (["--device", "meta"], "holds no data"),
    (["--pattern", "heads", "--sparsity", "0.25", "--device-map", "auto"], "applies to unstructured and N:M"),
])
def test_bad_execution_options(llama_dir, text_file, tmp_path, capsys, options, expected):
    if options == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    message = refused(["--model", str(llama_dir), "--calib", str(text_file), *FAST, *options,
                       "--out", str(tmp_path / "out")], tmp_path, capsys)
    assert expected in message


# --- 11, 12. the Hub: fail at once, and say the real cause ---------------------------------------------


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:{port}"}])
def test_hub_datasets_offline_fail_at_once(llama_dir, tmp_path, env):
    # an empty Hugging Face cache of its own: offline mode must not find a copy this machine has
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path.parent / f"{tmp_path.name}-hf"),
           **{k: v.format(port=closed_port()) for k, v in env.items()}}
    message = refused_in_subprocess(["--model", str(llama_dir), *FAST, "--calib", "wikitext2",
                                     "--out", str(tmp_path / "out")], tmp_path, **env)
    assert "cannot load dataset 'wikitext2'" in message
    assert "unreachable" in message or "cannot reach" in message


def test_hub_tasks_offline_fail_at_once(llama_dir, tmp_path):
    message = refused_in_subprocess(["--model", str(llama_dir), *FAST, "--eval-tasks", "arc_easy",
                                     "--out", str(tmp_path / "out")], tmp_path,
                                    HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert "arc_easy needs its dataset from the Hugging Face Hub, which is unreachable" in message


def test_dataset_errors_say_their_real_cause(monkeypatch):
    import errno

    import datasets

    import llmprune.io.hub
    from llmprune.io.data import load_text

    monkeypatch.setattr(llmprune.io.hub, "hub_unreachable", lambda *a, **k: None)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/wikitext")

    monkeypatch.setattr(datasets, "load_dataset", full_disk)
    with pytest.raises(LlmpruneError, match="no space left on the device"):
        load_text("wikitext2", "evaluation")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"body": ["x"]}))
    with pytest.raises(LlmpruneError, match="has no column 'text' \\(its columns: body\\)"):
        load_text("wikitext2", "evaluation")


def test_a_gated_hub_model_says_so(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    import llmprune.io.hub
    from llmprune.jobs.stores import _hub_snapshot

    monkeypatch.setattr(llmprune.io.hub, "hub_unreachable", lambda *a, **k: None)

    from huggingface_hub.utils import httpx as client

    response = client.Response(401, request=client.Request("GET", "http://127.0.0.1/api/models/meta/x"))

    def gated(*args, **kwargs):
        raise GatedRepoError("401 Client Error: access to model meta/x is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(LlmpruneError, match="gated: accept its terms"):
        _hub_snapshot("meta/x")


# --- 13. the Python API ---------------------------------------------------------------------------------


def test_api_nm_pattern_sets_its_own_sparsity_and_lists_are_token_ids(tokenizer):
    import llmprune

    assert llmprune.PruneConfig(pattern="1:4").target_sparsity == 0.75
    assert llmprune.PruneConfig().target_sparsity == 0.5
    model = tiny.llama(len(tokenizer))
    ids = tiny.random_ids(2, 16).tolist()
    report = llmprune.prune(model, llmprune.PruneConfig(method="magnitude", pattern="2:4"), ids, device="cpu")
    assert report.sparsity == pytest.approx(0.5)
    with pytest.raises(LlmpruneError, match="equal-length lists"):
        llmprune.prune(model, llmprune.PruneConfig(method="magnitude"), [[1, 2], [3]], device="cpu")


def test_api_perplexity_follows_the_models_limit(tokenizer, monkeypatch):
    import llmprune
    import llmprune.api

    model = tiny.llama(len(tokenizer))  # max_position_embeddings 128
    seen = []
    monkeypatch.setattr(llmprune.api, "evaluation_data", lambda tok, src, seqlen, n: seen.append(seqlen) or
                        tiny.random_ids(1, seqlen))
    llmprune.perplexity(model, tokenizer, "pydoc")
    assert seen == [128]
    with pytest.raises(LlmpruneError, match="exceeds the model's limit of 128"):
        llmprune.perplexity(model, tokenizer, "pydoc", seqlen=2048)


def test_api_errors_name_fields_not_recipe_sections():
    from llmprune.jobs.recipe import job_from_dict
    from llmprune.structured.run import StructuredConfig

    with pytest.raises(LlmpruneError) as caught:
        StructuredConfig("structured")
    assert str(caught.value).startswith("pattern structured needs params")
    with pytest.raises(LlmpruneError) as caught:
        job_from_dict({"model": "m", "prune": {"sparsity": 2.0}})
    assert "recipe" not in str(caught.value) and str(caught.value).startswith("prune: sparsity")


def test_recipe_module_example_loads():
    import yaml

    import llmprune.jobs.recipe
    from llmprune.jobs.recipe import job_from_dict

    doc = llmprune.jobs.recipe.__doc__ or ""
    example = doc.split("\n\n")[1]
    job = job_from_dict(yaml.safe_load(textwrap.dedent(example)))
    assert job.calibration.samples == 128 and job.prune.pattern == "2:4"


# --- 14. help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", [[], ["eval"], ["sweep"]])
def test_help_shows_every_default(sub, capsys):
    import llmprune.cli.commands as cli

    parser = {(): cli._prune_parser, ("eval",): cli._eval_parser, ("sweep",): cli._sweep_parser}[tuple(sub)]()


    with pytest.raises(SystemExit):
        main([*sub, "--help"])
    text = capsys.readouterr().out
    entries: dict[str, str] = {}  # each option's entry: the lines from its flags to the next option
    flag = ""
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
        if flag:
            entries[flag] = entries.get(flag, "") + " " + line.strip()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, [], "==SUPPRESS=="):
            entry = next(entries[f] for f in action.option_strings if f in entries)
            assert "default" in entry, entry
    if not sub:
        assert "(default: 128)" in entries["--nsamples"]
        assert "llmprune eval MODEL" in text and "llmprune sweep" in text and "llmprune push DIR" in text


def test_version(capsys):
    import llmprune

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.strip() == f"llmprune {llmprune.__version__}"


def test_sweep_prints_its_grid_and_leaves_no_folder_when_it_fails_at_once(llama_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, _, err = run(["sweep", "--model", str(tmp_path / "no-such-model"), "--out", str(out),
                        "--methods", "wanda", "--sparsities", "0.5", "--patterns", ""], capsys)
    assert code == 2 and "does not exist" in err.splitlines()[-1]
    assert "llmprune sweep: 1 points" in err and "wanda unstructured 0.5" in err
    assert not out.exists() and hidden(tmp_path) == []
    short = tmp_path / "short.txt"
    short.write_text("too short")  # fails once the model is loaded and the folder made
    code, _, err = run(["sweep", "--model", str(llama_dir), "--out", str(out), "--methods", "wanda",
                        "--sparsities", "0.5", "--patterns", "", "--calib", str(short), "--eval", str(short),
                        "--seqlen", "16", "--eval-seqlen", "16", "--quiet"], capsys)
    assert code == 2 and "calibration text has" in err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


# --- process-wide effects and numerics that the pipeline work fixed -------------------------------


def test_api_record_holds_the_job_not_the_hosts_command_line(llama_dir, text_file, tmp_path):
    import yaml

    import llmprune
    from llmprune.jobs.recipe import job_from_dict

    job = llmprune.Job(model=str(llama_dir), prune=llmprune.PruneConfig(method="magnitude", pattern="2:4"),
                       calibration=llmprune.CalibrationConfig(str(text_file), 2, 16),
                       evaluation=llmprune.EvalConfig(None), out=str(tmp_path / "out"), device="cpu")
    record = llmprune.run_job(job)
    assert record["command"] is None and "argv" not in record and sys.argv[0] not in json.dumps(record)
    card = (tmp_path / "out" / "README.md").read_text()
    recipe = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    # The card's recipe is the same job, with the count of generated windows resolved (none here:
    # a method is named), so a rerun of it samples exactly what this run did.
    resolved = dataclasses.replace(job, calibration=dataclasses.replace(job.calibration, generated=0))
    assert job_from_dict(yaml.safe_load(recipe)) == resolved


def test_prune_keeps_the_callers_train_mode(tokenizer):
    import llmprune

    model = tiny.llama(len(tokenizer)).train()
    model.model.layers[1].eval()
    llmprune.prune(model, llmprune.PruneConfig(method="wanda"), tiny.random_ids(2, 16), device="cpu")
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training


def test_bfloat16_on_a_cpu_is_computed_in_float32(tokenizer):
    import llmprune
    from llmprune.engine.driver import compute_dtype

    assert compute_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    ids = tiny.random_ids(4, 16)
    half, full = tiny.llama(len(tokenizer)).to(torch.bfloat16), tiny.llama(len(tokenizer)).to(torch.bfloat16).float()
    config = llmprune.PruneConfig(method="sparsegpt", pattern="2:4")
    llmprune.prune(half, config, ids, device="cpu")
    llmprune.prune(full, config, ids, device="cpu")  # the same weights, computed in float32 throughout
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    attention, reference = half.model.layers[0].self_attn, full.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):  # the first group sees the same inputs in both runs
        a, b = getattr(attention, name).weight, getattr(reference, name).weight
        assert torch.equal(a, b.to(torch.bfloat16)), name


def test_a_square_conv1d_gradient_is_transposed_by_type():
    from transformers.pytorch_utils import Conv1D

    from llmprune.engine.gradients import LossGradients

    conv, linear = Conv1D(4, 4), torch.nn.Linear(4, 4)
    g = torch.arange(16.0).reshape(4, 4)
    gradients = LossGradients({"c.weight": g}, {"c.weight": g * 2}, 1)
    assert all(torch.equal(a, b) for a, b in zip(gradients.of("c", conv), (g.T, 2 * g.T), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(gradients.of("c", linear), (g, 2 * g), strict=True))


def test_sweep_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from llmprune.jobs.sweep import plot

    before = matplotlib.get_backend()
    record = {"setup": {"model": "m", "evaluation": {"source": "x"}}, "dense_ppl": 10.0,
              "points": [{"method": "wanda", "pattern": "unstructured", "sparsity_target": 0.5, "ppl": 20.0}]}
    plot(record, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0 and matplotlib.get_backend() == before
