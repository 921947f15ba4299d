"""Decode speed: tokens per second of greedy generation at batch 1, the latency users feel."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from llmprune.engine.model import polled
from llmprune.progress import Cancel

PROMPT = "The history of the city begins in the early Middle Ages, when"


@torch.no_grad()
def decode_speed(model: Any, tokenizer: Any, new_tokens: int = 64, repeats: int = 3,
                 prompt: str = PROMPT, device: str | torch.device | None = None,
                 cancel: Cancel | None = None) -> dict[str, Any]:
    """Median tokens/s over ``repeats`` greedy generations of exactly ``new_tokens`` tokens from
    the same prompt (after one warm-up), on ``device`` (default: where the model is); ``cancel``
    is polled before each generation step."""
    home = next(model.parameters()).device
    run_device = torch.device(device) if device is not None else home
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(run_device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.to(run_device)

    def generate(count: int) -> float:
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
        tick = time.perf_counter()
        model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=pad)
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
        return time.perf_counter() - tick

    try:
        with polled(model, cancel, "while measuring decode speed"):
            generate(min(8, new_tokens))
            seconds = [generate(new_tokens) for _ in range(repeats)]
    finally:
        model.to(home)
    return {"tokens_per_s": new_tokens / statistics.median(seconds), "new_tokens": new_tokens,
            "prompt_tokens": ids.shape[1], "repeats": repeats, "threads": torch.get_num_threads(),
            "device": str(run_device)}


def weights_bytes(model: Any) -> int:
    """Bytes of the model's parameters, each shared (tied) tensor counted once."""
    seen: dict[int, int] = {}
    for param in model.parameters():
        seen[param.data_ptr()] = param.numel() * param.element_size()
    return sum(seen.values())
