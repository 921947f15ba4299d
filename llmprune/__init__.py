"""llmprune: post-training pruning of Hugging Face causal language models.

Importing the package has no side effects (no threads set, no downloads, no logging setup).

    import llmprune
    model, tok = llmprune.load_model("smollm2-135m")
    calib = llmprune.calibration_data(tok, "wikipedia", nsamples=32, seqlen=512)
    with llmprune.InputNorms(model) as norms:  # as the CLI's default: a quarter written by the model
        calib = llmprune.generated_windows(model, tok, calib, 8, 0, "cpu")
    report = llmprune.prune(model, llmprune.PruneConfig(sparsity=0.7), calib, owl_norms=norms)  # OWL reads them
    smaller, report = llmprune.prune_structured(model, llmprune.StructuredConfig("heads", sparsity=0.3), calib)
    curves = llmprune.sensitivity(model, llmprune.SensitivityConfig("wanda"), calib, held_out_ids)
    study = llmprune.saliency(model, llmprune.SaliencyConfig(layers=(0, 14, 29)), calib)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

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
    "__version__",
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


def __getattr__(name: str) -> Any:
    # Lazy: `import llmprune` stays cheap and never imports torch until something is used.
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("llmprune.api"), name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
