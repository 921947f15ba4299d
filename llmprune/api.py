"""The public Python API, re-exported by the package."""

from __future__ import annotations

from typing import Any

from llmprune.analysis.oracle import SaliencyConfig, SaliencyResult, saliency
from llmprune.analysis.sensitivity import SensitivityConfig, SensitivityResult, sensitivity
from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.engine.driver import PruneReport, prune
from llmprune.engine.gradients import LossGradients, loss_gradients
from llmprune.engine.model import window_length
from llmprune.engine.observe import InputNorms
from llmprune.errors import Cancelled, LlmpruneError
from llmprune.eval.perplexity import perplexity as _perplexity
from llmprune.eval.speed import decode_speed
from llmprune.io.data import calibration_data, evaluation_data
from llmprune.io.generated import generated_windows
from llmprune.io.loading import load as load_model
from llmprune.jobs.pipeline import run as run_job
from llmprune.jobs.recipe import load_recipe
from llmprune.jobs.spec import EvalConfig, Job, TasksConfig
from llmprune.jobs.sweep import SweepConfig, run_sweep
from llmprune.progress import Event
from llmprune.structured.run import StructuredConfig, StructuredReport, prune_structured


def perplexity(model: Any, tokenizer: Any, source: str = "wikipedia", seqlen: int | None = None,
               windows: int | None = None) -> float:
    """Perplexity on the first ``windows`` non-overlapping windows of ``source``'s evaluation
    text; ``seqlen`` None = min(2048, the model's limit), and longer than the limit is an error."""
    return _perplexity(model, evaluation_data(tokenizer, source, window_length(seqlen, model), windows))


__all__ = [
    "CalibrationConfig",
    "Cancelled",
    "EvalConfig",
    "Event",
    "InputNorms",
    "Job",
    "LlmpruneError",
    "LossGradients",
    "PruneConfig",
    "PruneReport",
    "SaliencyConfig",
    "SaliencyResult",
    "SensitivityConfig",
    "SensitivityResult",
    "StructuredConfig",
    "StructuredReport",
    "SweepConfig",
    "TasksConfig",
    "calibration_data",
    "decode_speed",
    "generated_windows",
    "load_model",
    "load_recipe",
    "loss_gradients",
    "perplexity",
    "prune",
    "prune_structured",
    "run_job",
    "run_sweep",
    "saliency",
    "sensitivity",
]
