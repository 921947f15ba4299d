"""A whole pruning job as a short list of stages over a model store.

    load → calibrate → eval dense → tasks dense → speed dense → prune → eval pruned →
    tasks pruned → speed pruned → record → save → publish → (push)

Every job runs these stages: unstructured, N:M, structured and depth pruning, in memory or
streamed (:mod:`llmprune.jobs.stores` decides where the model lives). A stage with nothing to
do (no evaluation text, no tasks) returns at once. Each stage reports typed progress events
(:class:`~llmprune.progress.Event`) and polls ``cancel`` inside its loop; a cancelled or failed
job publishes nothing and removes its staging folder (a streamed run keeps what ``--resume``
needs). A new stage (recovery, expert pruning) is one function added to :data:`STAGES`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.config import PruneConfig
from llmprune.engine.curves import read_curves
from llmprune.engine.driver import PruneReport, resolve_device
from llmprune.engine.model import window_length
from llmprune.errors import LlmpruneError
from llmprune.eval.perplexity import perplexity
from llmprune.eval.speed import decode_speed, weights_bytes
from llmprune.io.data import calibration_data, check_text_source, evaluation_data, wants_bos
from llmprune.io.export import OutputLock, check_output, publish_folder
from llmprune.io.generated import PREFIX
from llmprune.io.loading import BUILTIN_MODELS
from llmprune.io.memory import reset_peaks
from llmprune.jobs.card import model_card, read_saliency, structured_card
from llmprune.jobs.record import build_record, build_structured_record, warn_before_work
from llmprune.jobs.spec import EvalConfig as EvalConfig  # re-exported: the specs' old home
from llmprune.jobs.spec import Job as Job
from llmprune.jobs.spec import TasksConfig as TasksConfig
from llmprune.jobs.stores import ModelStore, open_store
from llmprune.jobs.stores import streaming_source as streaming_source
from llmprune.progress import Cancel, Event, Progress, Steps, check_cancel
from llmprune.structured.experts import remove_experts
from llmprune.structured.run import StructuredConfig, StructuredReport, prune_structured

log = logging.getLogger(__name__)


@dataclass
class State:
    """What the stages of one job share."""

    job: Job
    out: Path | None
    device: torch.device
    store: ModelStore
    progress: Progress | None = None
    cancel: Cancel | None = None
    command: list[str] | None = None
    manager: Any = None  # lm-eval's task manager, when tasks are asked for
    timings: dict[str, float] = field(default_factory=dict)
    calibration: torch.Tensor | None = None
    windows: torch.Tensor | None = None
    dense: dict[str, Any] | None = None
    pruned: dict[str, Any] | None = None
    tasks: dict[str, Any] = field(default_factory=dict)
    report: PruneReport | StructuredReport | None = None
    speed: dict[str, Any] = field(default_factory=dict)
    bytes_dense: int = 0
    record: dict[str, Any] | None = None
    staging: Path | None = None
    published: bool = False

    def steps(self, stage: str, total: int, unit: str) -> Steps:
        return Steps(self.progress, self.cancel, stage, total, unit)

    def timed(self, key: str, tick: float) -> None:
        self.timings[key] = time.perf_counter() - tick


def load(state: State) -> None:
    steps = state.steps("load", 1, "models")
    steps(0)
    tick = time.perf_counter()
    state.store.load()
    state.timed("load_s", tick)
    steps(1)


def calibrate(state: State) -> None:
    job, store = state.job, state.store
    steps = state.steps("calibrate", 1, "sets")
    steps(0)
    tick = time.perf_counter()
    cal = job.calibration
    state.calibration = calibration_data(store.tokenizer, cal.source, cal.samples,
                                         window_length(cal.seqlen, store.model), cal.seed)
    if job.evaluation.source:
        state.windows = evaluation_data(store.tokenizer, job.evaluation.source,
                                        window_length(job.evaluation.seqlen, store.model),
                                        job.evaluation.windows or None)
    state.timed("calibration_data_s", tick)
    count = generated_count(job, store, state.calibration.shape[1])
    if count:
        tick = time.perf_counter()
        state.calibration = store.generate(state.calibration, count, cal.seed, state.device, state.progress,
                                           state.cancel)
        state.timed("generate_s", tick)
    state.job = job = dataclasses.replace(job, calibration=dataclasses.replace(cal, generated=count))
    warn_before_work(job)
    store.prepare(state.calibration, state.device)
    steps(1)


def generated_count(job: Job, store: ModelStore, seqlen: int | None = None) -> int:
    """How many calibration windows the dense model writes itself (:mod:`llmprune.io.generated`).
    Asked for: that many. Left unsaid: a quarter of the samples when the default recipe (no
    method named) prunes unstructured or N:M on a model held whole in memory; none when a method
    is named (the reference methods' own protocol) or the model is streamed or device-mapped
    (sampling needs the whole model in one place), or the windows (``seqlen`` tokens) are too
    short to continue."""
    asked = job.calibration.generated
    if asked is not None:
        return asked
    if not (isinstance(job.prune, PruneConfig) and job.prune.uses_default):
        return 0
    if not store.can_generate():
        log.info("the default recipe's self-generated calibration windows are left out: the model is not "
                 "held whole in memory (streamed or device-mapped)")
        return 0
    if seqlen is not None and seqlen <= PREFIX + 1:
        return 0
    return job.calibration.samples // 4


def _evaluate(state: State, which: str) -> dict[str, Any] | None:
    if state.windows is None:
        return None
    tick = time.perf_counter()
    windows = state.windows
    ppl = state.store.perplexity(windows, state.device, state.job.evaluation.batch_size, f"eval {which}",
                                 state.progress, state.cancel)
    state.timed(f"eval_{which}_s", tick)
    return {"source": state.job.evaluation.source, "split": "evaluation", "seqlen": windows.shape[1],
            "windows": windows.shape[0], "tokens": windows.numel(),
            "bos": wants_bos(state.store.tokenizer) is not None, "ppl": ppl}


def evaluate_dense(state: State) -> None:
    state.dense = _evaluate(state, "dense")


def evaluate_pruned(state: State) -> None:
    state.pruned = _evaluate(state, "pruned")


def _tasks(state: State, which: str) -> None:
    if state.manager is None:
        return
    from llmprune.eval.tasks import evaluate_tasks

    steps = state.steps(f"tasks {which}", 1, "runs")
    steps(0)
    tick = time.perf_counter()
    config = state.job.tasks
    state.tasks[which] = evaluate_tasks(state.store.model, state.store.tokenizer, config.names,
                                        include=config.include, limit=config.limit,
                                        num_fewshot=config.num_fewshot, batch_size=config.batch_size,
                                        device=state.device, manager=state.manager, cancel=state.cancel,
                                        layer_devices=state.store.devices)
    state.timed(f"tasks_{which}_s", tick)
    steps(1)


def tasks_dense(state: State) -> None:
    _tasks(state, "dense")


def tasks_pruned(state: State) -> None:
    _tasks(state, "pruned")


def _speed(state: State, which: str) -> None:
    # Decode speed is what structured pruning buys; a sparse checkpoint runs at dense speed here.
    if not isinstance(state.job.prune, StructuredConfig):
        return
    if which == "dense":
        state.bytes_dense = weights_bytes(state.store.model)
    if state.job.decode_tokens:
        steps = state.steps(f"speed {which}", 1, "runs")
        steps(0)
        state.speed[which] = decode_speed(state.store.model, state.store.tokenizer, state.job.decode_tokens,
                                          device=state.device, cancel=state.cancel)
        steps(1)


def speed_dense(state: State) -> None:
    _speed(state, "dense")


def speed_pruned(state: State) -> None:
    _speed(state, "pruned")


def prune(state: State) -> None:
    job, store = state.job, state.store
    assert state.calibration is not None
    if isinstance(job.prune, StructuredConfig):
        structured = remove_experts if job.prune.pattern == "experts" else prune_structured
        smaller, report = structured(store.model, job.prune, state.calibration, device=state.device,
                                     batch_size=job.batch_size, progress=state.progress, cancel=state.cancel)
        store.replace(smaller)  # the zeroed dense model is dropped here
        state.report = report
    else:
        state.report = store.prune(job.prune, state.calibration, state.device, job.batch_size, state.progress,
                                   state.cancel)
    state.timings["prune_s"] = state.report.seconds


def record(state: State) -> None:
    job, model = state.job, state.store.model
    assert state.calibration is not None and state.report is not None
    if isinstance(state.report, StructuredReport):
        result = build_structured_record(job, model, state.report, state.calibration, state.dense, state.pruned,
                                         state.timings, state.device, state.command, state.speed.get("dense"),
                                         state.speed.get("pruned"), state.bytes_dense)
        if job.saliency:
            result["saliency"] = read_saliency(job.saliency)
    else:
        result = build_record(job, model, state.report, state.calibration, state.dense, state.pruned,
                              state.timings, state.device, state.command)
    if state.tasks:
        result["tasks"] = state.tasks
    facts = state.store.facts()
    if facts is not None:
        result["streaming"] = facts
    state.record = result


def save(state: State) -> None:
    if state.out is None:
        return
    assert state.record is not None
    steps = state.steps("save", 1, "checkpoints")
    steps(0)
    tick = time.perf_counter()
    card = structured_card if isinstance(state.report, StructuredReport) else model_card
    state.staging = state.store.write(state.out, state.record, card)
    state.record["timings"]["save_s"] = time.perf_counter() - tick
    steps(1)


def publish(state: State) -> None:
    if state.out is None:
        return
    assert state.staging is not None and state.record is not None
    check_cancel(state.cancel, "before publishing")
    publish_folder(state.staging, state.out, state.job.overwrite)  # holds signals around its renames
    state.published = True
    state.record["out"] = str(state.out)


Stage = Callable[[State], None]
STAGES: list[Stage] = [load, calibrate, evaluate_dense, tasks_dense, speed_dense, prune, evaluate_pruned,
                       tasks_pruned, speed_pruned, record, save, publish]


def evaluate_ppl(model: Any, tokenizer: Any, config: EvalConfig, device: torch.device,
                 progress: Progress | None = None, cancel: Cancel | None = None) -> dict[str, Any]:
    """Perplexity of an in-memory ``model`` under ``config``, with the protocol's facts (for
    ``llmprune eval`` and sweeps)."""
    assert config.source is not None
    seqlen = window_length(config.seqlen, model)
    windows = evaluation_data(tokenizer, config.source, seqlen, config.windows or None)
    home = next(model.parameters()).device
    model.to(device)
    tick = time.perf_counter()
    try:
        ppl = perplexity(model, windows, batch_size=config.batch_size, progress=progress, cancel=cancel)
    finally:
        model.to(home)
    return {"source": config.source, "split": "evaluation", "seqlen": seqlen,
            "windows": windows.shape[0], "tokens": windows.numel(), "bos": wants_bos(tokenizer) is not None,
            "ppl": ppl, "seconds": time.perf_counter() - tick}


def read_paths(job: Job) -> list[Path]:
    """Local paths the job reads (the model, its text files): the output may not replace them."""
    candidates = [job.calibration.source, job.evaluation.source or ""]
    if isinstance(job.prune, PruneConfig) and job.prune.sensitivity:
        candidates.append(job.prune.sensitivity)
    if job.saliency:
        candidates.append(job.saliency)
    if job.model in BUILTIN_MODELS:
        from llmprune.io.assets import cache_dir

        paths = [cache_dir() / "models" / job.model]
    else:
        candidates.append(job.model)
        paths = []
    return paths + [Path(c).expanduser() for c in candidates if c and Path(c).expanduser().exists()]


def known_figures(state: State) -> dict[str, Any]:
    """The headline figures a stage has measured so far (each key only once it is known): dense
    and pruned perplexity, the achieved sparsity of the pruned layers, lm-eval results."""
    found: dict[str, Any] = {}
    if state.dense is not None:
        found["ppl_dense"] = state.dense["ppl"]
    if isinstance(state.report, PruneReport):
        found["sparsity_achieved"] = state.report.sparsity
    if state.pruned is not None:
        found["ppl_pruned"] = state.pruned["ppl"]
    if state.tasks:
        found["tasks"] = state.tasks
    return found


def check_job(job: Job) -> Path | None:
    """Everything about ``job`` that can be refused before any work; returns the resolved
    output folder (None: nothing is saved)."""
    if job.push_to_hub and not job.out:
        raise LlmpruneError("push_to_hub (--push-to-hub) uploads the saved checkpoint; give an output folder (--out)")
    if job.device_map and job.calibration.generated:
        raise LlmpruneError("calibration.generated (--generated) samples from the whole model on one device; "
                            "drop --device-map or give --generated 0")
    if job.device_map and isinstance(job.prune, StructuredConfig):
        raise LlmpruneError("device_map (--device-map) applies to unstructured and N:M pruning; structured pruning "
                            "runs each layer on device (--device)")
    for source in (job.calibration.source, job.evaluation.source):
        if source:
            check_text_source(source)
    if isinstance(job.prune, PruneConfig) and job.prune.sensitivity:
        read_curves(job.prune.sensitivity)  # readable and by layer; the layer count once the model is known
    if job.saliency:
        read_saliency(job.saliency)
    if job.out and job.offload_dir:
        offload, out = Path(job.offload_dir).expanduser().resolve(), Path(job.out).expanduser().resolve()
        if offload.is_relative_to(out):
            raise LlmpruneError(f"offload_dir (--offload-dir) {offload} is inside the output folder {out}; "
                                "put it elsewhere")
    return check_output(job.out, job.overwrite, read_paths(job)) if job.out else None  # before hours of work


def run(job: Job, progress: Progress | None = None, cancel: Cancel | None = None,
        command: list[str] | None = None,
        on_saved: Callable[[dict[str, Any]], None] | None = None,
        figures: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``job`` through :data:`STAGES`; returns the record also written to ``llmprune.json``.
    ``progress`` is given an :class:`~llmprune.progress.Event` at every step of every stage;
    ``cancel`` is polled inside each. ``on_saved`` is given the record once it is complete and
    the checkpoint published, before any Hub push, so a failed push never loses it. ``figures`` is
    given the headline figures known so far (:func:`known_figures`) each time a stage adds one.
    ``command``: the command line that asked for the job (None: an API call, which the record's
    recipe then stands for). Peak memory is counted from here."""
    out = check_job(job)
    device = resolve_device(job.device)
    manager = None
    if job.tasks.names:
        from llmprune.eval.tasks import check_tasks

        manager = check_tasks(job.tasks.names, job.tasks.include)
    lock = OutputLock(out).acquire() if out is not None else None
    try:
        state = State(job, out, device, open_store(job, out), progress, cancel, command, manager)
        reset_peaks()  # the record's peaks are this job's
        try:
            known: dict[str, Any] = {}
            for stage in STAGES:
                check_cancel(cancel, f"before {stage.__name__.replace('_', ' ')}")
                stage(state)
                if figures is not None and known_figures(state) != known:
                    known = known_figures(state)
                    figures(known)
        finally:
            state.store.close(failed=not state.published and out is not None)
    finally:
        if lock is not None:
            lock.release()
    assert state.record is not None
    if on_saved is not None:
        on_saved(state.record)
    return push_record(job, state.record, progress, cancel)


def push_record(job: Job, record: dict[str, Any], progress: Progress | None = None,
                cancel: Cancel | None = None) -> dict[str, Any]:
    """Push the published checkpoint when asked. A failed push keeps the checkpoint and says how
    to push it later."""
    if job.push_to_hub and record.get("out"):
        from llmprune.io.hub import push

        check_cancel(cancel, f"before the push; the checkpoint is saved in {record['out']}")
        if progress is not None:
            progress(Event("push", 0, 1, "uploads"))
        try:
            record["pushed_to"] = push(Path(record["out"]), job.push_to_hub, private=job.private)
        except LlmpruneError as exc:
            raise LlmpruneError(f"{exc}; the checkpoint is saved in {record['out']}: push it later with "
                                f"`llmprune push {record['out']} --repo {job.push_to_hub}`") from None
        if progress is not None:
            progress(Event("push", 1, 1, "uploads"))
    return record
