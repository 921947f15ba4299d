"""Calibration and evaluation text, and turning it into token windows.

Sources (``--calib`` / ``--eval``):

* ``wikipedia``: built-in offline Wikipedia lead sections (calibration and evaluation splits are
  disjoint, see :func:`llmprune.io.assets.wikipedia_text`);
* ``wikipedia-validation``: a third disjoint slice of the same articles, one text for both uses:
  the text to choose settings on, so the evaluation split stays unseen;
* ``pydoc``: Python's own documentation topics (stdlib ``pydoc_data``), offline and off-domain;
* ``wikitext2``, ``c4``, ``ptb``: the standard sets through ``datasets`` (needs the Hub);
* a local ``.txt`` file, or ``.jsonl`` with one ``{"text": ...}`` object (or string) a line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import LlmpruneError

SPLITS = ("calibration", "evaluation")
HUB_SETS = ("wikitext2", "c4", "ptb")
BUILTIN = ("wikipedia", "wikipedia-validation", "pydoc")
SPLIT_SOURCES = ("wikipedia", *HUB_SETS)  # sources whose calibration and evaluation texts are disjoint


def load_text(source: str, split: str) -> str:
    """The text of ``source`` for ``split`` ("calibration" or "evaluation")."""
    if split not in SPLITS:
        raise ValueError(split)
    if source == "wikipedia":
        from llmprune.io.assets import wikipedia_text

        return wikipedia_text(split)
    if source == "wikipedia-validation":
        from llmprune.io.assets import wikipedia_text

        return wikipedia_text("validation")
    if source == "pydoc":
        from pydoc_data import topics

        return "\n\n".join(topics.topics.values())
    if source in HUB_SETS:
        return _hub_text(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        raise LlmpruneError(f"text source {path} is a folder; give a .txt or .jsonl file")
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        return _file_text(path)
    raise LlmpruneError(
        f"unknown text source {source!r}: use {', '.join(BUILTIN + HUB_SETS)} or a .txt/.jsonl file"
    )


def check_text_source(source: str) -> None:
    """Read a local text source now (a missing, undecodable or malformed file fails before any
    work); named sources are checked when they are loaded."""
    if source in BUILTIN or source in HUB_SETS:
        return
    load_text(source, "calibration")


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise LlmpruneError(f"text file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LlmpruneError(f"text file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}); convert it, e.g. iconv -t utf-8") from None
    except OSError as exc:
        raise LlmpruneError(f"cannot read text file {path}: {exc.strerror or exc}") from None
    if path.suffix not in (".jsonl", ".json"):
        return raw
    parts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LlmpruneError(f"{path}:{number}: not JSON ({exc.msg})") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise LlmpruneError(f"{path}:{number}: expected a string or an object with a 'text' string")
        parts.append(text)
    return "\n\n".join(parts)


def _hub_text(name: str, split: str) -> str:
    """Standard sets, joined as in the SparseGPT/Wanda evaluation code."""
    from llmprune.io.hub import describe_hub_error, hub_errors, hub_unreachable

    offline = "; offline, use 'wikipedia', 'pydoc' or a local .txt/.jsonl file"
    reason = hub_unreachable()
    if reason is not None and "HF_HUB_OFFLINE" not in reason:  # offline mode reads the cache, quickly
        raise LlmpruneError(f"cannot load dataset {name!r}: the Hugging Face Hub is unreachable ({reason}){offline} "
                            "(HF_HUB_OFFLINE=1 uses a cached copy)")
    from datasets import load_dataset

    column = "sentence" if name == "ptb" else "text"
    try:
        if name == "wikitext2":
            data: Any = load_dataset("wikitext", "wikitext-2-raw-v1",
                                     split="train" if split == "calibration" else "test")
        elif name == "ptb":
            data = load_dataset("ptb_text_only", "penn_treebank", split="train" if split == "calibration" else "test")
        else:
            shard = ("en/c4-train.00000-of-01024.json.gz" if split == "calibration"
                     else "en/c4-validation.00000-of-00008.json.gz")
            data = load_dataset("allenai/c4", data_files={"x": shard}, split="x")
    except hub_errors() as exc:
        raise LlmpruneError(f"cannot load dataset {name!r} through datasets: {describe_hub_error(exc)}"
                            f"{offline if reason else ''}") from None
    if column not in data.column_names:
        raise LlmpruneError(f"dataset {name!r} has no column {column!r} (its columns: "
                            f"{', '.join(data.column_names)}); its schema changed")
    texts = data[column]
    if name == "ptb":
        return " ".join(texts)
    if name == "c4" and split == "evaluation":
        return " ".join(texts[:1100])
    return "\n\n".join(texts)


def wants_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts one at the start of a text by default (Llama 2, Gemma),
    else None. Each window then starts with BOS, as the model saw in training."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one (1, N) row of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.to(torch.long)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], 1)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets: (nsamples, seqlen).

    Offsets come from ``random.Random(seed).randint(0, N - L - 1)``, the scheme of the SparseGPT
    and Wanda calibration loaders, so the same text and seed give the same windows. With a BOS
    the window holds BOS + (seqlen - 1) text tokens.
    """
    body = seqlen - (bos is not None)
    total = tokens.shape[-1]
    if total < body + 1:
        raise LlmpruneError(
            f"calibration text has {total} tokens, fewer than one sequence of {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    rng = random.Random(seed)
    flat = tokens.reshape(-1)
    starts = [rng.randint(0, total - body - 1) for _ in range(nsamples)]
    return _with_bos(torch.stack([flat[s : s + body] for s in starts]), bos)


def evaluation_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
                       bos: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of the tokenized text: (windows, seqlen).

    The published perplexity protocol (GPTQ/SparseGPT/Wanda): the test text joined, tokenized
    once, cut into ``len // seqlen`` windows; the tail is dropped. ``max_windows`` keeps the
    first ones only. With a BOS each window is BOS + (seqlen - 1) text tokens.
    """
    body = seqlen - (bos is not None)
    count = tokens.shape[-1] // body
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise LlmpruneError(f"evaluation text has {tokens.shape[-1]} tokens, fewer than one window of {seqlen}")
    return _with_bos(tokens.reshape(-1)[: count * body].reshape(count, body), bos)


def calibration_data(tokenizer: Any, source: str = "wikipedia", nsamples: int = 128,
                     seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) calibration token ids drawn from ``source``."""
    tokens = tokenize(tokenizer, load_text(source, "calibration"))
    return calibration_windows(tokens, nsamples, seqlen, seed, wants_bos(tokenizer))


def evaluation_data(tokenizer: Any, source: str = "wikipedia", seqlen: int = 2048,
                    max_windows: int | None = None) -> torch.Tensor:
    """(windows, seqlen) evaluation token ids of ``source`` (see :func:`evaluation_windows`)."""
    tokens = tokenize(tokenizer, load_text(source, "evaluation"))
    return evaluation_windows(tokens, seqlen, max_windows, wants_bos(tokenizer))
