"""The public Python API, re-exported by the package."""

from __future__ import annotations

from typing import Any

import torch

from llmprune.config import CalibrationConfig, PruneConfig
from llmprune.data import calibration_windows, evaluation_windows, load_text, tokenize, wants_bos
from llmprune.driver import PruneReport, prune
from llmprune.errors import Cancelled, LlmpruneError
from llmprune.evaluate import perplexity as _perplexity
from llmprune.job import EvalConfig, Job
from llmprune.job import run as run_job
from llmprune.loading import load as load_model


def calibration_data(tokenizer: Any, source: str = "wikipedia", nsamples: int = 128,
                     seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) token ids from ``source`` (see :mod:`llmprune.data`)."""
    text = load_text(source, "calibration")
    return calibration_windows(tokenize(tokenizer, text), nsamples, seqlen, seed, wants_bos(tokenizer))


def perplexity(model: Any, tokenizer: Any, source: str = "wikipedia", seqlen: int = 2048,
               windows: int | None = None) -> float:
    """Perplexity on the first ``windows`` non-overlapping windows of ``source``'s evaluation text."""
    tokens = tokenize(tokenizer, load_text(source, "evaluation"))
    return _perplexity(model, evaluation_windows(tokens, seqlen, windows, wants_bos(tokenizer)))


__all__ = [
    "CalibrationConfig", "Cancelled", "EvalConfig", "Job", "LlmpruneError", "PruneConfig",
    "PruneReport", "calibration_data", "load_model", "perplexity", "prune", "run_job",
]
