"""Calibration windows written by the dense model itself.

The layer-wise solver fits each pruned layer to the dense layer's outputs on the calibration
tokens, so it fits best where those tokens are typical of the model. An off-domain calibration
text (Python documentation for a prose model) pulls the fit towards that domain; text the dense
model samples from its own distribution does not. :func:`generated_windows` replaces the first
``count`` calibration windows with text the dense model samples (temperature 1, no top-k or top-p
truncation), so the windows keep their number and length; the rest stay real text.

Each replaced window is cut into pieces of about :data:`CHUNK` tokens, and each piece is sampled
on its own from the real window's first :data:`PREFIX` tokens at that place. Sampling costs a
step per token, and every step reads every weight whatever the batch: for SmolLM2 on 2 CPU
threads a step of 32 sequences took 205 ms against 123 ms for 8, so the 32 pieces of 8 windows
of 512 (124 steps) took 17-19 s where the 8 whole windows (508 steps) took 63-75 s (README, "Why
pieces of 128"). The windows then look like packed pre-training text (several passages one after
the other) rather than one long sample.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from llmprune.errors import LlmpruneError
from llmprune.progress import Cancel, Progress, Steps

PREFIX = 4  # real tokens kept at the start of each piece, as its prompt
CHUNK = 128  # tokens per sampled piece (windows shorter than 2 pieces are sampled whole)
BATCH = 32  # pieces sampled together: bounds the key/value cache


def check_generated(count: int, samples: int, seqlen: int) -> None:
    """Refuse a generated count the calibration set cannot take, in one line, before any work."""
    if count > samples:
        raise LlmpruneError(f"calibration.generated={count} is more than the {samples} calibration samples")
    if count and seqlen <= PREFIX + 1:
        raise LlmpruneError(f"calibration.generated needs windows longer than {PREFIX + 1} tokens, got {seqlen}")


def piece_bounds(seqlen: int) -> list[int]:
    """Where the sampled pieces of one window start and end: ``seqlen // CHUNK`` pieces (at least
    one) of nearly equal length, so none is shorter than a :data:`CHUNK` or the whole window."""
    pieces = max(1, seqlen // CHUNK)
    return [round(i * seqlen / pieces) for i in range(pieces + 1)]


def tokens_read(count: int, seqlen: int) -> int:
    """The tokens the model reads while writing ``count`` windows of ``seqlen``: every piece is
    sampled to the longest piece's length, and its last token is drawn but never read."""
    bounds = piece_bounds(seqlen)
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    return count * (len(bounds) - 1) * (longest - 1)


def draw(scores: torch.Tensor, forbidden: list[int]) -> torch.Tensor:
    """One token per row, sampled from ``softmax(scores)`` (temperature 1, no truncation) with the
    ``forbidden`` ids never drawn: the first id whose cumulative probability exceeds one uniform
    draw per row. The same distribution as ``torch.multinomial``, which draws an exponential
    variate for every vocabulary entry instead: about a quarter of the sampling time on a CPU at
    SmolLM2's 49k vocabulary (README, "Why pieces of 128")."""
    scores = scores.float()
    if forbidden:  # a copy: the caller's scores stay as they were
        scores = scores.index_fill(1, torch.tensor(forbidden, device=scores.device), -float("inf"))
    cdf = torch.softmax(scores, -1).cumsum(-1)
    u = torch.rand(scores.shape[0], 1, device=scores.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(1)
    past = token >= scores.shape[1]  # u is below the total, but rounding could reach past the end
    if bool(past.any()):
        token[past] = scores[past].argmax(-1)
    return token


class _Draw:
    """A logits processor that samples the next token itself (:func:`draw`) and leaves greedy
    decoding one finite score to take, so generation keeps its own caching for every
    architecture while the draw costs one uniform per row."""

    def __init__(self, forbidden: list[int]) -> None:
        self.forbidden = forbidden

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = draw(scores, self.forbidden)
        return torch.full_like(scores, -float("inf")).scatter_(1, token[:, None], 0.0)


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


def end_ids(model: Any, eos: int | list[int] | None) -> set[int]:
    """The end-of-text ids of the tokenizer and of the model's own generation settings (some
    models end on several)."""
    ids: set[int] = set()
    settings = getattr(model, "generation_config", None)
    for value in (eos, getattr(settings, "eos_token_id", None)):
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return ids


def generated_windows(model: Any, tokenizer: Any, calibration: torch.Tensor, count: int, seed: int,
                      device: torch.device | str, progress: Progress | None = None,
                      cancel: Cancel | None = None) -> torch.Tensor:
    """``calibration`` with its first ``count`` windows replaced by the model's own text: each
    piece (:func:`piece_bounds`) continues the real window's first :data:`PREFIX` tokens there.
    Same shape; seeded, so a rerun gives the same tokens on the same device. The pieces are
    sampled window by window, :data:`BATCH` at a time. The model is moved to ``device`` for the
    sampling and back."""
    device = torch.device(device)
    samples, seqlen = calibration.shape
    check_generated(count, samples, seqlen)
    if count == 0:
        return calibration
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    bounds = piece_bounds(seqlen)
    per_window = len(bounds) - 1
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    prompts = torch.stack([calibration[w, a:a + PREFIX] for w in range(count) for a in bounds[:-1]])
    new = longest - PREFIX
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    # Greedy decoding over the scores _Draw leaves: the sampling is _Draw's (temperature 1, no
    # truncation), and it never draws an end-of-text id, so every piece runs to max_new_tokens.
    config = GenerationConfig(do_sample=False, max_new_tokens=new, use_cache=True,
                              eos_token_id=eos, pad_token_id=pad if pad is not None else eos)
    forbidden = sorted(end_ids(model, eos))
    steps = Steps(progress, cancel, "generate calibration", count, "windows")
    steps(0)
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    # generate fills what a configuration leaves unset from the model's own generation settings;
    # penalties, banned or forced tokens there would bend the distribution, so they sit out.
    settings = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    parts = []
    try:
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), BATCH):
                prompt = prompts[start:start + BATCH].to(device)
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                     logits_processor=LogitsProcessorList([_Draw(forbidden)]),
                                     stopping_criteria=StoppingCriteriaList([_Tick(steps, start // per_window)]))
                if out.shape[1] != longest:  # no end-of-text is ever drawn: anything else is a bug
                    raise LlmpruneError(f"generation gave {out.shape[1]} tokens per piece, expected {longest}")
                parts.append(out.to(calibration.device, calibration.dtype))
                steps((start + len(prompt)) // per_window)
    finally:
        model.generation_config = settings
        model.to(home)
        model.train(was_training)
    pieces = torch.cat(parts).view(count, per_window, longest)
    # Each piece keeps its own length: the shorter ones drop the tail they were sampled beyond it.
    windows = torch.cat([pieces[:, i, :b - a] for i, (a, b) in enumerate(itertools.pairwise(bounds))], 1)
    return torch.cat([windows, calibration[count:]])
