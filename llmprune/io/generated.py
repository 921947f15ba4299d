"""Calibration windows written by the dense model itself.

The layer-wise solver fits each pruned layer to the dense layer's outputs on the calibration
tokens, so it fits best where those tokens are typical of the model. An off-domain calibration
text (Python documentation for a prose model) pulls the fit towards that domain; text the dense
model samples from its own distribution does not. :func:`generated_windows` replaces the first
``count`` calibration windows with continuations the dense model samples (temperature 1, no
top-k or top-p truncation) from each window's own first :data:`PREFIX` tokens, so the windows keep
their number, length and starting tokens; the rest stay real text. Measured in the README
("Self-generated calibration").
"""

from __future__ import annotations

from typing import Any

import torch

from llmprune.errors import LlmpruneError
from llmprune.progress import Cancel, Progress, Steps

PREFIX = 4  # tokens of each real window kept as the prompt of its generated replacement
BATCH = 8  # windows sampled together: bounds the key/value cache, and 8 is what the default uses


def check_generated(count: int, samples: int, seqlen: int) -> None:
    """Refuse a generated count the calibration set cannot take, in one line, before any work."""
    if count > samples:
        raise LlmpruneError(f"calibration.generated={count} is more than the {samples} calibration samples")
    if count and seqlen <= PREFIX + 1:
        raise LlmpruneError(f"calibration.generated needs windows longer than {PREFIX + 1} tokens, got {seqlen}")


class _Tick:
    """A stopping criterion that never stops: it reports progress and polls cancellation once
    per generated token (generation has no other hook between tokens)."""

    def __init__(self, steps: Steps, windows_before: int) -> None:
        self.steps, self.windows_before, self.tokens = steps, windows_before, 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.tokens += 1
        if self.tokens % 32 == 0:  # the windows finished so far do not change until the batch ends
            self.steps(self.windows_before)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generated_windows(model: Any, tokenizer: Any, calibration: torch.Tensor, count: int, seed: int,
                      device: torch.device | str, progress: Progress | None = None,
                      cancel: Cancel | None = None) -> torch.Tensor:
    """``calibration`` with its first ``count`` windows replaced by the model's own continuations
    of their first :data:`PREFIX` tokens (same shape; seeded, so a rerun gives the same tokens on
    the same device). The model is moved to ``device`` for the sampling and back."""
    device = torch.device(device)
    samples, seqlen = calibration.shape
    check_generated(count, samples, seqlen)
    if count == 0:
        return calibration
    from transformers import GenerationConfig, StoppingCriteriaList

    new = seqlen - PREFIX
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new,
                              max_new_tokens=new, use_cache=True, eos_token_id=eos,
                              pad_token_id=pad if pad is not None else eos)
    steps = Steps(progress, cancel, "generate calibration", count, "windows")
    steps(0)
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    parts = []
    try:
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, count, BATCH):
                prompt = calibration[start:min(start + BATCH, count), :PREFIX].to(device)
                tick = _Tick(steps, start)
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                     stopping_criteria=StoppingCriteriaList([tick]))
                if out.shape[1] != seqlen:  # min_new_tokens = max_new_tokens: anything else is a bug
                    raise LlmpruneError(f"generation gave {out.shape[1]} tokens per window, expected {seqlen}")
                parts.append(out.to(calibration.device, calibration.dtype))
                steps(start + prompt.shape[0])
    finally:
        model.to(home)
        model.train(was_training)
    return torch.cat([*parts, calibration[count:]])
