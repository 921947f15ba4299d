"""One job in a process of its own: ``python -m llmprune.service.worker WORKDIR JOB DEVICE THREADS``.

The server starts it fresh (never forked from a process that holds torch's threads). It runs the
job through the pipeline's Python API, its progress events and log lines going to the job's
event list in the database and its cancel flag polled from there. The job succeeds only once
its checkpoint folder is published and every file in it is listed with its SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprune.errors import Cancelled, LlmpruneError
from llmprune.io.journal import FOLDER as JOURNAL_FOLDER
from llmprune.progress import Event
from llmprune.service.db import Database
from llmprune.service.layout import Layout

CANCEL_POLL_S = 0.5  # how often the cancel flag is read from the database
STOPPED = 143  # the exit code of a worker stopped by a signal, its job queued again


class Stopped(BaseException):
    """SIGTERM or SIGINT: the server is stopping (or someone asked this worker to). The job goes
    back to the queue; a streamed one resumes from its journal next time."""


@dataclass
class StopRequest:
    """How a worker stops on SIGTERM or SIGINT. A streamed job whose journal exists finishes the
    decoder layer in flight (the pipeline polls :meth:`asked` with the cancel flag between
    layers), so the next attempt resumes after it; any other job stops at once, since it starts
    again from the beginning anyway. Repeats of the signal change nothing (Ctrl-C reaches the
    worker and the server, and the server then signals the worker too): a worker that takes too
    long is killed by the server after its ``--stop-grace``."""

    journal: Path
    signal_name: str | None = None

    def handle(self, signum: int, _: Any) -> None:
        if self.signal_name is not None:
            return
        self.signal_name = signal.Signals(signum).name
        if not self.journal.is_dir():
            raise Stopped(self.signal_name)

    def asked(self) -> bool:
        return self.signal_name is not None


@dataclass
class Pace:
    """When the current stage should end, from the pace since it began (its first event)."""

    stage: str | None = None
    began: float = 0.0
    done: int = 0

    def eta(self, event: Event, now: float) -> float | None:
        if event.stage != self.stage:
            self.stage, self.began, self.done = event.stage, now, event.done
        gained = event.done - self.done
        if gained <= 0 or event.done >= event.total:
            return None
        return now + (now - self.began) / gained * (event.total - event.done)


class EventLog(logging.Handler):
    """llmprune's log lines as the job's events."""

    def __init__(self, db: Any, job_id: str) -> None:
        super().__init__(logging.INFO)
        self.db, self.job_id = db, job_id

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.db.add_event(self.job_id, "log", {"level": record.levelname, "message": record.getMessage()})
        except Exception:  # a log line never fails the job
            self.handleError(record)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /v1/jobs/{id}`` shows of the record."""
    evaluation = record.get("evaluation") or {}
    keys = ("kind", "method", "pattern", "sparsity_target", "sparsity_achieved", "timings", "memory", "device",
            "threads", "checkpoint_bytes", "parameters", "decode_speed", "tasks", "pushed_to")
    found = {key: record[key] for key in keys if key in record}
    found["ppl_dense"], found["ppl_pruned"] = evaluation.get("ppl_dense"), evaluation.get("ppl_pruned")
    return found


def run_job(layout: Layout, job_id: str, device: str, threads: int, stop: StopRequest | None = None,
            db: Any = None) -> int:
    """Run one job, its state written to ``db``: the service's :class:`Database` (by default),
    or anything with the same job methods (a Ray job relays them to the server)."""
    import torch

    from llmprune.jobs.pipeline import run
    from llmprune.jobs.recipe import job_from_dict
    from llmprune.structured.run import StructuredConfig

    torch.set_num_threads(threads)
    db = db if db is not None else Database(layout.database)
    row = db.get(job_id)
    if row is None:
        return 2
    folder = layout.job(job_id)
    out = folder / "out"
    (folder / "cwd").mkdir(parents=True, exist_ok=True)
    try:
        job = job_from_dict({**row["recipe"], "out": str(out)}, "request")
    except LlmpruneError as exc:  # checked at submission; a newer llmprune may read it differently
        db.finish(job_id, "failed", str(exc))
        return 0
    partial = out.parent / f".{out.name}.partial"
    resumable = partial.is_dir() and not isinstance(job.prune, StructuredConfig) and job.stream != "off"
    for stale in folder.glob(f".{out.name}.partial*"):  # what an earlier, killed attempt left (ours)
        if stale != partial or not resumable:
            shutil.rmtree(stale, ignore_errors=True)
    job = dataclasses.replace(job, out=str(out), device=device, resume=resumable, overwrite=not resumable,
                              offload_dir=None)
    if stop is not None:  # from here a signal lets a streamed job finish its layer in flight
        stop.journal = partial / JOURNAL_FOLDER
    handler = EventLog(db, job_id)
    logger = logging.getLogger("llmprune")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if resumable:
        db.add_event(job_id, "log", {"level": "INFO", "message": f"resuming from {partial.name}"})
    last_poll, cancelled = 0.0, False
    pace = Pace()

    def progress(event: Event) -> None:
        db.update(job_id, stage=event.stage, done=event.done, total=event.total, unit=event.unit,
                  eta=pace.eta(event, time.time()))
        db.add_event(job_id, "progress", event._asdict())

    def figures(known: dict[str, Any]) -> None:
        db.update(job_id, result=known)

    def cancel() -> bool:
        nonlocal last_poll, cancelled
        if stop is not None and stop.asked():
            return True
        now = time.monotonic()
        if not cancelled and now - last_poll >= CANCEL_POLL_S:
            last_poll, cancelled = now, db.cancel_requested(job_id)
        return cancelled

    try:
        record = run(job, progress=progress, cancel=cancel, command=None, figures=figures)
    except Stopped as exc:
        db.add_event(job_id, "log", {"level": "INFO", "message": f"stopped by {exc}; queued again"})
        db.requeue(job_id)
        return STOPPED
    except Cancelled as exc:
        if stop is not None and stop.asked():  # our own stop, between two decoder layers
            where = str(exc).removeprefix("cancelled ")
            db.add_event(job_id, "log", {"level": "INFO", "message": f"stopped by {stop.signal_name} {where}; "
                                         "queued again, to resume from its journal"})
            db.requeue(job_id)
            return STOPPED
        db.add_event(job_id, "log", {"level": "INFO", "message": str(exc)})
        db.finish(job_id, "cancelled", str(exc))
        return 0
    except LlmpruneError as exc:
        db.add_event(job_id, "log", {"level": "ERROR", "message": str(exc)})
        db.finish(job_id, "failed", str(exc))
        return 0
    except Exception as exc:
        db.add_event(job_id, "log", {"level": "ERROR", "message": traceback.format_exc()})
        db.finish(job_id, "failed", f"internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        logger.removeHandler(handler)
    layout.write_manifest(job_id)
    db.add_event(job_id, "log", {"level": "INFO", "message": "checkpoint published and verified"})
    db.finish(job_id, "succeeded", result=json.loads(json.dumps(summary(record), default=str)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    workdir, job_id, device, threads = args
    stop = StopRequest(Path(workdir) / "no-journal-yet")  # until the job's own is known
    signal.signal(signal.SIGTERM, stop.handle)
    signal.signal(signal.SIGINT, stop.handle)
    layout = Layout(Path(workdir))
    try:
        return run_job(layout, job_id, device, int(threads), stop)
    except Stopped as exc:  # before the job began (importing torch, reading the recipe)
        db = Database(layout.database)
        db.add_event(job_id, "log", {"level": "INFO", "message": f"stopped by {exc} before it began; queued again"})
        db.requeue(job_id)
        return STOPPED


if __name__ == "__main__":
    sys.exit(main())
