"""The public Python API, re-exported by the package."""

from __future__ import annotations

from typing import Any

from llmprune.config import CalibrationConfig, PruneConfig
from llmprune.data import calibration_data, evaluation_data
from llmprune.driver import PruneReport, prune
from llmprune.errors import Cancelled, LlmpruneError
from llmprune.evaluate import perplexity as _perplexity
from llmprune.job import run as run_job
from llmprune.loading import load as load_model
from llmprune.model import window_length
from llmprune.recipe import load_recipe
from llmprune.spec import EvalConfig, Job, TasksConfig
from llmprune.speed import decode_speed
from llmprune.structured.run import StructuredConfig, StructuredReport, prune_structured
from llmprune.sweep import SweepConfig, run_sweep


def perplexity(model: Any, tokenizer: Any, source: str = "wikipedia", seqlen: int | None = None,
               windows: int | None = None) -> float:
    """Perplexity on the first ``windows`` non-overlapping windows of ``source``'s evaluation
    text; ``seqlen`` None = min(2048, the model's limit), and longer than the limit is an error."""
    return _perplexity(model, evaluation_data(tokenizer, source, window_length(seqlen, model), windows))


__all__ = [
    "CalibrationConfig",
    "Cancelled",
    "EvalConfig",
    "Job",
    "LlmpruneError",
    "PruneConfig",
    "PruneReport",
    "StructuredConfig",
    "StructuredReport",
    "SweepConfig",
    "TasksConfig",
    "calibration_data",
    "decode_speed",
    "load_model",
    "load_recipe",
    "perplexity",
    "prune",
    "prune_structured",
    "run_job",
    "run_sweep",
]
