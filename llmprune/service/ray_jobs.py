"""Jobs on an existing Ray cluster (``llmprune serve --executor ray --ray-address ADDR``).

Each job runs in a Ray actor of its own, placed by Ray where the resources it asks for are free
(``num_cpus`` = the slot's threads; ``num_gpus=1`` for a CUDA slot). The actor is *detached* and
named after the job, so it outlives the server: a restarted server finds it again by name and
takes over. It runs the same :func:`~llmprune.service.worker.run_job` as a local worker, but
every database call the job makes is kept in a :class:`Relay` inside the actor, and the server
drains it into its own SQLite store a few times a second: that store stays the only source of
truth, on the server's disk (SQLite over a network file system is not safe). Outputs go to the
shared ``--workdir`` that every node mounts at the same path.

Cancel is the pipeline's cooperative cancel (a flag the job polls), then, past the cancel grace,
``ray.kill`` of the actor. An actor that dies (its process killed, its node lost) fails its job
with Ray's reason, except that a streamed job with a journal is queued once more and resumes
after its last finished layer. A finished job's actor is killed once its last calls are drained.

An actor's name carries a tag of the service's workdir, so two services on one cluster never
touch each other's actors; a starting server kills its own leftovers (actors no running job
owns: a server stopped between a job's end and its actor's kill). A job the cluster has not
placed within the placement timeout (no node with the CPUs and GPU it asks for, or none free)
fails with what it asked for, rather than waiting unseen.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.io.journal import FOLDER as JOURNAL_FOLDER
from llmprune.service.db import Database
from llmprune.service.layout import Layout
from llmprune.service.scheduler import CANCEL_GRACE_S, POLL_S, Slot

NAMESPACE = "llmprune"
CONNECT_TIMEOUT_S = 10.0
PLACEMENT_TIMEOUT_S = 600.0  # a job not placed by then fails (0: it waits as long as it takes)
# The job methods a relayed job may call on the server's database, and nothing else.
RELAYED = {"add_event", "update", "finish", "requeue"}


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (before the server listens: a wrong one is one line)."""
    try:
        import ray
    except ImportError:
        raise LlmpruneError("--executor ray needs Ray: pip install 'llmprune[ray]'") from None
    if ray.is_initialized():
        return
    host, _, port = (address or "").rpartition(":")
    host = host.strip("[]")
    if host and "/" not in host and port.isdigit():  # Ray itself retries an unreachable head for minutes
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise LlmpruneError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    try:  # "auto": an existing cluster only (None would start a private one that dies with the server)
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LlmpruneError(f"cannot reach the Ray cluster at {address}: {first}") from None


def actor_prefix(workdir: Path) -> str:
    """What every actor of the service on ``workdir`` is named with: its own, whatever else the
    cluster runs (another service's jobs have another tag)."""
    tag = hashlib.sha256(str(workdir.expanduser().resolve()).encode()).hexdigest()[:10]
    return f"llmprune-{tag}-job-"


def actor_name(prefix: str, job_id: str, attempt: int) -> str:
    """Each attempt's actor has a name of its own (a dead actor's name may not be free at once)."""
    return f"{prefix}{job_id}-{attempt}"


def asks(threads: int, gpu: bool) -> str:
    return f"{threads} CPU{'s' if threads != 1 else ''}{' and 1 GPU' if gpu else ''}"


def room_for(threads: int, gpu: bool) -> str | None:
    """None when a live node of the cluster has ``threads`` CPUs (and a GPU) in all; else what
    the largest has (free or not: Ray places an actor on one node)."""
    import ray

    sizes = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
             for n in ray.nodes() if n.get("Alive")]
    if any(cpus >= threads and (gpus >= 1 or not gpu) for cpus, gpus in sizes):
        return None
    cpus, gpus = max(sizes, default=(0.0, 0.0))
    return f"no node of the Ray cluster has {asks(threads, gpu)} (the largest: {cpus:g} CPUs, {gpus:g} GPUs)"


Call = tuple[int, str, tuple[Any, ...], dict[str, Any]]  # (sequence number, method, args, kwargs)


class Relay:
    """What a job asks of the database, numbered and kept until the server says it has stored
    it (a call the server fails to store, or never receives, comes again with the next drain);
    the cancel flag is the one thing the server sends."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.outbox: list[Call] = []
        self.sequence = 0
        self.lock = threading.Lock()
        self.cancel = False

    def _put(self, name: str, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.sequence += 1
            self.outbox.append((self.sequence, name, args, kwargs))

    def get(self, job_id: str) -> dict[str, Any]:
        return self.row

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        self._put("add_event", job_id, kind, data)

    def update(self, job_id: str, **fields: Any) -> None:
        self._put("update", job_id, **fields)

    def finish(self, job_id: str, status: str, error: str | None = None, result: Any = None) -> bool:
        self._put("finish", job_id, status, error, result)
        return True

    def requeue(self, job_id: str) -> bool:
        self._put("requeue", job_id)
        return True

    def cancel_requested(self, job_id: str) -> bool:
        return self.cancel

    def pending(self, stored: int) -> list[Call]:
        """Drop the calls up to ``stored`` (the server has them); the rest, in order."""
        with self.lock:
            self.outbox = [call for call in self.outbox if call[0] > stored]
            return list(self.outbox)


class JobActor:
    """One job on the cluster (wrapped by ``ray.remote`` when launched). The job starts from the
    constructor, in a thread of the actor's own: a detached actor's creation belongs to the
    cluster, whereas a method call would belong to the server that sent it and be lost with it
    if that server stopped before the actor was ready."""

    def __init__(self, workdir: str, job_id: str, row: dict[str, Any], device: str, threads: int) -> None:
        self.layout, self.job_id = Layout(Path(workdir)), job_id
        self.relay = Relay(row)
        self.done = False
        self.thread = threading.Thread(target=self.run, args=(device, threads), name=f"job-{job_id}", daemon=True)
        self.thread.start()

    def run(self, device: str, threads: int) -> None:
        from llmprune.service.worker import run_job

        try:
            run_job(self.layout, self.job_id, device, threads, db=self.relay)
        except BaseException as exc:  # run_job reports the job's own errors; this is anything else
            self.relay.finish(self.job_id, "failed", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.done = True

    def drain(self, stored: int) -> dict[str, Any]:
        done = self.done  # read first: calls made before it was set are in this batch
        return {"calls": self.relay.pending(stored), "done": done}

    def cancel(self) -> None:
        self.relay.cancel = True

    def pid(self) -> int:
        return os.getpid()


@dataclass
class Placed:
    job: str
    actor: Any
    cancel_sent: float | None = None
    drain: Any = None  # the drain call in flight (one at a time: an unread one would be lost)
    stored: int = 0  # the last relayed call committed to the database
    answered: bool = False  # the actor has answered a drain (it was placed and runs)
    since: float = field(default_factory=time.monotonic)  # sent to the cluster (or adopted) at
    request: tuple[int, bool] | None = None  # the CPUs and GPU it asked for (None: adopted, not known)


@dataclass
class RayScheduler:
    """The :class:`~llmprune.service.scheduler.Scheduler`'s interface over Ray: as many jobs at
    once as there are slots, each slot's device and threads the resources its job asks for."""

    layout: Layout
    db: Database
    slots: list[Slot]
    address: str | None
    say: Any = print
    cancel_grace: float = CANCEL_GRACE_S
    placement_timeout: float = PLACEMENT_TIMEOUT_S
    placed: dict[str, Placed] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    prefix: str = ""  # of this service's actor names (actor_prefix of the workdir, set by start)

    def start(self) -> None:
        import ray

        connect(self.address)
        self.prefix = actor_prefix(self.layout.workdir)
        gpus = float(ray.cluster_resources().get("GPU", 0))
        for slot in self.slots:  # --workers N: one GPU a job on a cluster that has GPUs
            if slot.device == "auto":
                slot.device = "cuda" if gpus > 0 else "cpu"
        for job in self.db.jobs("running"):  # left running by an earlier server: adopt what lives
            try:
                actor = ray.get_actor(actor_name(self.prefix, job["id"], job["attempts"]), namespace=NAMESPACE)
            except ValueError:
                self.lost(job["id"], "its Ray actor is gone (it died while the server was down)")
                continue
            self.placed[job["id"]] = Placed(job["id"], actor)
            free = [s for s in self.slots if s.job is None]
            if free:
                free[0].job = job["id"]
            self.say(f"llmprune serve: job {job['id']} still runs on the Ray cluster; following it again")
        self.sweep()
        self.thread = threading.Thread(target=self.loop, name="llmprune-ray-scheduler", daemon=True)
        self.thread.start()

    def sweep(self) -> None:
        """Kill this service's actors that no running job owns: left by a server stopped between
        a job's end and its actor's kill, or an attempt since replaced. Other services' actors
        (another prefix) are not ours to touch."""
        import ray
        from ray.util import list_named_actors

        owned = {actor_name(self.prefix, job["id"], job["attempts"]) for job in self.db.jobs("running")}
        for name in list_named_actors():  # this namespace's live actors
            if not name.startswith(self.prefix) or name in owned:
                continue
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:  # gone meanwhile
                continue
            self.say(f"llmprune serve: stopped {name}, a Ray actor no running job owns")

    def loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:  # the scheduler must outlive any one job's trouble
                logging.getLogger(__name__).exception("Ray scheduler step failed")
            self.stop_event.wait(POLL_S)

    def step(self) -> None:
        for placed in list(self.placed.values()):
            try:
                self.watch(placed)
            except Exception:  # one job's trouble (a locked database, say) must not stall the others
                logging.getLogger(__name__).exception("watching job %s failed; trying again", placed.job)
        busy = len(self.placed)
        for slot in [s for s in self.slots if s.job is None][:max(0, len(self.slots) - busy)]:
            if self.stop_event.is_set():
                return
            job = self.db.claim()
            if job is None:
                return
            try:
                self.launch(slot, job["id"])
            except Exception as exc:  # the cluster refused the actor: the job, not the server, fails
                self.fail(job["id"], f"could not be placed on the Ray cluster: {type(exc).__name__}: {exc}")

    def launch(self, slot: Slot, job_id: str) -> None:
        import ray

        gpu = slot.device.startswith("cuda")
        row = self.db.get(job_id) or {}
        remote = ray.remote(JobActor).options(
            name=actor_name(self.prefix, job_id, int(row.get("attempts") or 1)), namespace=NAMESPACE,
            lifetime="detached", max_concurrency=2, max_restarts=0, num_cpus=slot.threads, num_gpus=1 if gpu else 0)
        actor: Any = remote.remote(str(self.layout.workdir), job_id, row, "cuda" if gpu else "cpu", slot.threads)
        slot.job = job_id
        self.placed[job_id] = Placed(job_id, actor, request=(slot.threads, gpu))
        self.db.add_event(job_id, "log", {"level": "INFO", "message": f"sent to the Ray cluster: "
                                          f"{asks(slot.threads, gpu)} (attempt {row.get('attempts')})"})
        short = room_for(slot.threads, gpu)
        if short:  # an autoscaling cluster may still grow: say so, and let the placement timeout decide
            wait = f"up to {self.placement_timeout:g} s" if self.placement_timeout else "as long as it takes"
            self.db.add_event(job_id, "log", {"level": "WARNING", "message": f"{short}; waiting {wait} for "
                                              "the cluster to place it"})

    def watch(self, placed: Placed) -> None:
        """Collect the actor's answer when there is one (never waiting for it), store its calls,
        then pass on a cancel."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        if placed.drain is None:
            placed.drain = placed.actor.drain.remote(placed.stored)
        ready, _ = ray.wait([placed.drain], timeout=0)
        if ready:
            reference, placed.drain = placed.drain, None
            try:
                batch = ray.get(reference)
            except ActorUnavailableError:
                batch = None  # not answering for now (a restart of its node's link); ask again
            except RayActorError as exc:
                self.kill(placed)  # dead, or never to be reached: nothing of it may go on
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.lost(placed.job, f"its Ray actor died: {first}")
                return
            if batch is not None:
                placed.answered = True
                for sequence, name, args, kwargs in batch["calls"]:
                    if name in RELAYED:
                        getattr(self.db, name)(*args, **kwargs)  # raises: not marked stored, sent again
                    placed.stored = sequence
                if batch["done"]:
                    row = self.db.get(placed.job)
                    if row is not None and row["status"] == "running":  # ended without a final word
                        self.fail(placed.job, "the job's Ray actor ended without finishing the job")
                    self.kill(placed)
                    return
        if (not placed.answered and self.placement_timeout
                and time.monotonic() - placed.since > self.placement_timeout):
            short = room_for(*placed.request) if placed.request else None
            self.kill(placed)  # a pending actor's creation is called off with it
            asked = asks(*placed.request) if placed.request else "its slot"
            self.fail(placed.job, f"the Ray cluster did not place it within {self.placement_timeout:g} s "
                                  f"(it asks for {asked}" + (f"; {short})" if short else ")"))
            return
        if placed.cancel_sent is None and self.db.cancel_requested(placed.job):
            placed.actor.cancel.remote()
            placed.cancel_sent = time.monotonic()
        elif placed.cancel_sent is not None and time.monotonic() - placed.cancel_sent >= self.cancel_grace:
            reason = f"cancelled (the job did not stop within {self.cancel_grace:g} s; its Ray actor was killed)"
            self.db.add_event(placed.job, "log", {"level": "INFO", "message": reason})
            self.db.finish(placed.job, "cancelled", reason)
            self.kill(placed)

    def lost(self, job_id: str, reason: str) -> None:
        """A job whose actor died: run once more when it streams and its journal (on the shared
        workdir) lets the next attempt resume after its last finished layer; else failed."""
        row = self.db.get(job_id)
        journal = self.layout.job(job_id) / ".out.partial" / JOURNAL_FOLDER
        if row is not None and row["attempts"] < 2 and journal.is_dir():
            self.db.add_event(job_id, "log", {"level": "ERROR", "message": reason})
            self.db.add_event(job_id, "log", {"level": "INFO", "message": "queued again once, to resume from its "
                                              "journal"})
            self.db.requeue(job_id)
            return
        self.fail(job_id, reason)

    def fail(self, job_id: str, reason: str) -> None:
        self.db.add_event(job_id, "log", {"level": "ERROR", "message": reason})
        self.db.finish(job_id, "failed", reason)

    def kill(self, placed: Placed) -> None:
        import ray

        try:
            ray.kill(placed.actor, no_restart=True)
        except Exception:  # already gone
            pass
        self.forget(placed)

    def forget(self, placed: Placed) -> None:
        self.placed.pop(placed.job, None)
        for slot in self.slots:
            if slot.job == placed.job:
                slot.job = None

    def stop(self) -> list[str]:
        """Stop following the cluster. Jobs on it run on (detached); the next server adopts them."""
        import ray

        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        for job_id in list(self.placed):
            self.say(f"llmprune serve: job {job_id} keeps running on the Ray cluster")
        ray.shutdown()
        return []
