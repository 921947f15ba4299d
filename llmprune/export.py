"""Write a pruned checkpoint that stock transformers loads, atomically.

The folder is assembled under a hidden temporary name beside ``out`` and renamed into place only
when complete, so an interrupted run never leaves a folder that looks like a finished checkpoint.
No ``sparsity_config`` goes into config.json (vLLM refuses checkpoints that carry one); what was
done is recorded in ``llmprune.json`` and the model card instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError

RECORD = "llmprune.json"
CARD = "README.md"


def check_output(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` exists without ``overwrite`` or is unwritable."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not overwrite:
        raise LlmpruneError(f"output folder {path} already exists; choose another --out or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise LlmpruneError(f"output path {path} exists and is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise LlmpruneError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    return path


def publish(out: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(staging)`` on a hidden temporary folder beside ``out``, then rename it to
    ``out``; on any error the temporary folder is removed and ``out`` is untouched."""
    out = check_output(out, overwrite)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is not
    old: Path | None = None
    try:
        write(staging)
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, old)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def save_checkpoint(model: Any, tokenizer: Any, out: Path, record: dict[str, Any],
                    card: str | Callable[[dict[str, Any]], str],
                    overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """safetensors (sharded above ``max_shard_size``) + config + tokenizer + record + card.
    ``record["checkpoint_bytes"]`` is set to the size of the saved weights; a callable ``card``
    is given the record after that."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        record["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        if config.pop("sparsity_config", None) is not None:
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (folder / CARD).write_text(card(record) if callable(card) else card)

    return publish(out, overwrite, write)


def write_json(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write a JSON file atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, target)
