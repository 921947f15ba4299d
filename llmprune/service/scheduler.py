"""Runs queued jobs in worker processes, one per slot (``--workers``), and watches them.

A worker that dies (a crash, the OOM killer, SIGKILL) leaves its job ``failed`` with the reason;
one stopped by SIGTERM or SIGINT queues it again;
a job asked to cancel that does not stop on its own within ``cancel_grace`` seconds is killed.
On shutdown, running workers are signalled (a streamed job finishes its decoder layer in flight)
and their jobs requeued; one still running after ``stop_grace`` seconds is killed and requeued
too. A streamed job resumes from its journal when the server starts again.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmprune.service.db import Database
from llmprune.service.layout import Layout

log = logging.getLogger(__name__)

POLL_S = 0.2
CANCEL_GRACE_S = 10.0  # a running job polls its cancel flag often; past this it is killed
STOP_GRACE_S = 60.0  # long enough for one decoder layer of a large model to finish


@dataclass
class Slot:
    device: str
    threads: int
    job: str | None = None
    process: subprocess.Popen[bytes] | None = None
    cancel_seen: float | None = None


@dataclass
class Scheduler:
    layout: Layout
    db: Database
    slots: list[Slot]
    say: Callable[[str], None] = print
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    requeued: set[str] = field(default_factory=set)
    cancel_grace: float = CANCEL_GRACE_S
    stop_grace: float = STOP_GRACE_S

    def start(self) -> None:
        for job_id in self.db.requeue_running():
            log.info("job %s was running when the server stopped; queued again", job_id)
        self.thread = threading.Thread(target=self.loop, name="llmprune-scheduler", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:  # the scheduler must outlive any one job's trouble
                log.exception("scheduler step failed")
            self.stop_event.wait(POLL_S)

    def step(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                self.watch(slot)
            if slot.process is None and not self.stop_event.is_set():
                job = self.db.claim()
                if job is not None:
                    self.launch(slot, job["id"])

    def launch(self, slot: Slot, job_id: str) -> None:
        folder = self.layout.job(job_id)
        (folder / "cwd").mkdir(parents=True, exist_ok=True)
        with open(folder / "worker.log", "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "llmprune.service.worker", str(self.layout.workdir), job_id, slot.device,
                 str(slot.threads)], cwd=folder / "cwd", stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        self.db.update(job_id, pid=process.pid)
        row = self.db.get(job_id) or {}
        self.db.add_event(job_id, "log", {"level": "INFO", "message": f"started on {slot.device}, "
                                          f"{slot.threads} threads (attempt {row.get('attempts')})"})
        slot.job, slot.process, slot.cancel_seen = job_id, process, None

    def watch(self, slot: Slot) -> None:
        assert slot.process is not None and slot.job is not None
        code = slot.process.poll()
        if code is None:
            if self.db.cancel_requested(slot.job):
                slot.cancel_seen = slot.cancel_seen or time.monotonic()
                if time.monotonic() - slot.cancel_seen >= self.cancel_grace:
                    slot.process.kill()
                    slot.process.wait()
                    reason = f"cancelled (the worker did not stop within {self.cancel_grace:g} s and was killed)"
                    self.db.add_event(slot.job, "log", {"level": "INFO", "message": reason})
                    self.db.finish(slot.job, "cancelled", reason)
                    self.clear(slot)
            return
        row = self.db.get(slot.job)
        if row is not None and row["status"] == "running" and code in (-signal.SIGTERM, -signal.SIGINT):
            # Stopped before it could say so (still importing): a stop, not a failure.
            self.db.requeue(slot.job)
            self.left(slot.job)
        elif row is not None and row["status"] == "running":  # the worker died without a word
            reason = describe_exit(code)
            self.db.add_event(slot.job, "log", {"level": "ERROR", "message": reason})
            self.db.finish(slot.job, "failed", reason)
        elif row is not None and row["status"] == "queued":  # stopped by a signal; it requeued itself
            self.left(slot.job)
        self.clear(slot)

    def left(self, job_id: str) -> None:
        if job_id not in self.requeued:
            self.requeued.add(job_id)
            self.say(f"llmprune serve: job {job_id} was stopped while running; queued again")

    def clear(self, slot: Slot) -> None:
        slot.job, slot.process, slot.cancel_seen = None, None, None

    def stop(self) -> list[str]:
        """Stop taking jobs; stop the running workers (each queues its job again) and say so, one
        line per job. Returns them."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        running = [slot for slot in self.slots if slot.process is not None and slot.job is not None]
        for slot in running:  # all at once: they stop side by side, within one grace period
            assert slot.process is not None
            if slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for slot in running:
            assert slot.process is not None and slot.job is not None
            try:
                slot.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()
                self.db.add_event(slot.job, "log", {"level": "INFO", "message": f"killed: still running "
                                                    f"{self.stop_grace:g} s after the server began to stop"})
            if self.db.requeue(slot.job) or (self.db.get(slot.job) or {}).get("status") == "queued":
                self.left(slot.job)
            self.clear(slot)
        return sorted(self.requeued)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {code} without finishing the job (see worker.log)"
