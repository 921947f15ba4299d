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
from llmprune.io.export import CARD, JOURNAL_FOLDER, RECORD
from llmprune.io.shards import INDEX


def hub_unreachable(endpoint: str | None = None, timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be used now (None: it answers). A TCP connection to the
    endpoint decides in at most ``timeout`` seconds, instead of the minute of retries
    ``datasets`` and ``huggingface_hub`` spend before they give up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    from urllib.request import getproxies, proxy_bypass

    url = urlparse(endpoint or constants.ENDPOINT)
    if url.scheme in getproxies() and not proxy_bypass(url.hostname or ""):
        return None  # reached through a proxy: only the real request can tell
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname}:{port} is unreachable ({exc.strerror or type(exc).__name__})"
    return None


def hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub (and datasets through it) raise for the Hub's answers and for a failing
    network: OSError, and the errors of its HTTP client, which are not OSError."""
    from huggingface_hub.utils import httpx as client

    return (OSError, client.HTTPError)


def describe_hub_error(exc: BaseException) -> str:
    """The real cause of a failed Hub download or upload, in a few words."""
    import errno

    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError
    from huggingface_hub.utils import httpx as client

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on the device ({exc.filename or 'the cache'})"
    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its terms on the Hub, then log in (hf auth login or HF_TOKEN)"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such repository on the Hub (or it is private and no token with access was given)"
    if isinstance(exc, (OfflineModeIsEnabled, client.TransportError, ConnectionError)):
        return f"cannot reach the Hugging Face Hub ({type(exc).__name__}: {first})"
    return f"{type(exc).__name__}: {first}"


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
    if (folder / JOURNAL_FOLDER).exists():
        raise LlmpruneError(f"{folder} still holds a resume journal; it is not a finished checkpoint")
    return record


def push(folder: Path, repo: str, *, private: bool = False, api: Any = None) -> str:
    """Create ``repo`` (if needed) and upload ``folder``; returns the repo URL. ``api``: an
    ``HfApi`` (default: one on the configured endpoint and token)."""
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise LlmpruneError(f"--repo must be OWNER/NAME, got {repo!r}")
    record = check_pushable(folder)
    from huggingface_hub import HfApi

    api = api or HfApi()
    message = f"llmprune: {record.get('method', '?')} {record.get('pattern', '')} of {record.get('base_model', '?')}"
    reason = hub_unreachable(getattr(api, "endpoint", None))
    if reason is not None:
        raise LlmpruneError(f"push to {repo} failed: cannot reach the Hugging Face Hub ({reason})")
    try:
        url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message,
                          ignore_patterns=[".*", "**/.*"])
    except hub_errors() as exc:
        raise LlmpruneError(f"push to {repo} failed: {describe_hub_error(exc)}") from None
    return str(url)
