"""Hub push through the real huggingface_hub client against a local stand-in of the Hub API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubstub import HubStub

from llmprune.errors import LlmpruneError
from llmprune.io.hub import check_pushable, push

TOKEN = "hf_llmprune_test_token_0123456789"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, llama_dir, text_file) -> Path:
    from llmprune.cli.commands import main

    out = tmp_path_factory.mktemp("push") / "pruned"
    argv = ["--model", str(llama_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--method", "wanda",
            "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out


def test_push_uploads_the_whole_folder_with_its_card(pruned):
    from huggingface_hub import HfApi

    with HubStub() as hub:
        url = push(pruned, "me/tiny-pruned", private=True, api=HfApi(endpoint=hub.endpoint, token=TOKEN))
        repo = hub.repos["me/tiny-pruned"]
    assert url.endswith("/me/tiny-pruned") and repo["private"] is True
    local = {p.name for p in pruned.iterdir() if p.is_file()}
    assert set(repo["files"]) == local
    assert repo["files"]["model.safetensors"] == (pruned / "model.safetensors").read_bytes()
    card = repo["files"]["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- llmprune" in card
    assert json.loads(repo["files"]["llmprune.json"])["method"] == "wanda"


def test_cli_push_takes_the_token_from_the_environment_and_never_shows_it(pruned, tmp_path):
    with HubStub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf")}
        done = subprocess.run([sys.executable, "-m", "llmprune.cli", "push", str(pruned), "--repo", "me/cli"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "pushed" in done.stdout
        assert TOKEN not in done.stdout + done.stderr
        auth = [headers.get("authorization", headers.get("Authorization")) for _, _, headers in hub.requests]
        assert auth and all(a == f"Bearer {TOKEN}" for a in auth)  # the token was used, from HF_TOKEN
        assert all(TOKEN.encode() not in data for data in hub.repos["me/cli"]["files"].values())
    assert not any(TOKEN in p.read_text(errors="ignore") for p in pruned.iterdir() if p.is_file())


def test_push_refuses_what_is_not_a_finished_llmprune_checkpoint(pruned, llama_dir, tmp_path):
    import shutil

    with pytest.raises(LlmpruneError, match="not an llmprune output"):
        check_pushable(llama_dir)  # a model folder, but not pruned by llmprune
    broken = tmp_path / "broken"
    shutil.copytree(pruned, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(LlmpruneError, match="incomplete"):
        check_pushable(broken)
    partial = tmp_path / ".out.partial"
    shutil.copytree(pruned, partial)
    with pytest.raises(LlmpruneError, match="unfinished"):
        check_pushable(partial)
    with pytest.raises(LlmpruneError, match="OWNER/NAME"):
        push(pruned, "no-owner")


def test_prune_with_push_to_hub_needs_out():
    from llmprune.jobs.pipeline import Job, run

    with pytest.raises(LlmpruneError, match="give an output folder"):
        run(Job(model="m", push_to_hub="me/x"))
