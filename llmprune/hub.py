"""Share a pruned checkpoint on the Hugging Face Hub.

The folder must be a complete llmprune output (its ``llmprune.json``, config, model card and every
weight shard present); the repo is created if needed and the folder uploaded in one commit. The
token comes from huggingface_hub's usual places (``HF_TOKEN``, ``huggingface-cli login``); it is
never printed or written anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.export import CARD, RECORD

INDEX = "model.safetensors.index.json"


def check_pushable(folder: Path) -> dict[str, Any]:
    """The folder's record, once it is known to be a complete llmprune checkpoint."""
    if not folder.is_dir():
        raise LlmpruneError(f"{folder} is not a folder")
    if folder.name.startswith(".") and ".partial" in folder.name:
        raise LlmpruneError(f"{folder} is an unfinished run's temporary folder; finish it with --resume first")
    record_path = folder / RECORD
    if not record_path.is_file():
        raise LlmpruneError(f"{folder} is not an llmprune output (no {RECORD}); only pruned checkpoints are pushed")
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        raise LlmpruneError(f"{record_path} is not valid JSON; the folder is damaged") from None
    for name in ("config.json", CARD):
        if not (folder / name).is_file():
            raise LlmpruneError(f"{folder} is incomplete: {name} is missing")
    index = folder / INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise LlmpruneError(f"{folder} is incomplete: shard {missing[0]} named by {INDEX} is missing")
    elif not (folder / "model.safetensors").is_file():
        raise LlmpruneError(f"{folder} is incomplete: no model.safetensors or {INDEX}")
    if (folder / ".llmprune-journal").exists():
        raise LlmpruneError(f"{folder} still holds a resume journal; it is not a finished checkpoint")
    return record


def push(folder: Path, repo: str, *, private: bool = False, api: Any = None) -> str:
    """Create ``repo`` (if needed) and upload ``folder``; returns the repo URL. ``api``: an
    ``HfApi`` (default: one on the configured endpoint and token)."""
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise LlmpruneError(f"--repo must be OWNER/NAME, got {repo!r}")
    record = check_pushable(folder)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    message = f"llmprune: {record.get('method', '?')} {record.get('pattern', '')} of {record.get('base_model', '?')}"
    try:
        url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message,
                          ignore_patterns=[".*", "**/.*"])
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LlmpruneError(f"push to {repo} failed: {first}") from None
    except OSError as exc:
        raise LlmpruneError(f"push to {repo} failed: cannot reach the Hub ({exc})") from None
    return str(url)
