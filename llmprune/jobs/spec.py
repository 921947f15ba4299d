"""What a job is: frozen, validated specs (plain data, no runtime state), shared by the job
runners, the recipes and the record."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.progress import Progress as Progress  # re-exported: its old home
from llmprune.structured.run import StructuredConfig


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity protocol: ``source`` text (None = skip), window length (None = min(2048, model
    limit)), and how many of the first windows to score (0 = all, the full published protocol)."""

    source: str | None = "wikipedia"
    seqlen: int | None = None
    windows: int = 16
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.windows < 0:
            raise LlmpruneError(f"eval windows must be >= 0 (0 = all), got {self.windows}")
        if self.seqlen is not None and self.seqlen < 2:
            raise LlmpruneError(f"eval seqlen must be >= 2, got {self.seqlen}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise LlmpruneError(f"eval batch size must be >= 1 (windows per forward), got {self.batch_size}")


@dataclass(frozen=True)
class TasksConfig:
    """lm-eval tasks run on the dense and the pruned model. ``names``: lm-eval task or group names
    (empty: none); ``include``: a folder of local task YAMLs; ``limit``: examples per task (a
    count, or a fraction below 1); ``num_fewshot``: None = each task's default."""

    names: tuple[str, ...] = ()
    include: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.limit is not None and not self.limit > 0:
            raise LlmpruneError(f"task limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise LlmpruneError(f"task batch size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Job:
    """``prune``: a :class:`PruneConfig` (unstructured, N:M) or a :class:`StructuredConfig`
    (heads, channels, structured, layers). ``decode_tokens``: for structured runs, tokens
    generated to measure decode speed before and after (0 = skip). ``saliency``: for structured
    runs, a ``saliency.json`` of ``llmprune analyze saliency`` whose correlation table goes into
    the model card."""

    model: str
    prune: PruneConfig | StructuredConfig = field(default_factory=PruneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None
    overwrite: bool = False
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    decode_tokens: int = 64
    stream: str = "auto"
    resume: bool = False
    offload_dir: str | None = None
    device_map: str | None = None
    tasks: TasksConfig = field(default_factory=TasksConfig)
    push_to_hub: str | None = None
    private: bool = False
    saliency: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 0:
            raise LlmpruneError(f"batch size must be >= 0 (0 or None: auto), got {self.batch_size}")
        if self.stream not in ("auto", "on", "off"):
            raise LlmpruneError(f"stream must be auto, on or off, got {self.stream!r}")
        streaming_only = [flag for flag, value in (("resume", self.resume), ("offload_dir", self.offload_dir))
                          if value]
        if streaming_only and self.stream == "off":
            raise LlmpruneError(f"{streaming_only[0]} needs streaming; drop stream='off' (--stream off)")
        if (streaming_only or self.stream == "on") and isinstance(self.prune, StructuredConfig):
            raise LlmpruneError("streaming, resume and offload_dir apply to unstructured and N:M pruning")
        if self.saliency is not None and not isinstance(self.prune, StructuredConfig):
            raise LlmpruneError("saliency (--saliency) puts the oracle study's correlations into a structured "
                                "run's model card; this job prunes unstructured or N:M")
        if (streaming_only or self.stream == "on") and not self.out:
            raise LlmpruneError("streaming writes the checkpoint as it goes; give an output folder (out, --out)")
