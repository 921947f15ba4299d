"""The HTTP API (version 1) on FastAPI: jobs submitted as recipes, watched, cancelled, fetched.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``. A recipe is checked by the
same code as YAML recipes, and its paths confined to the service's folders, before it is queued;
the job itself runs in a worker process (:mod:`llmprune.service.scheduler`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from llmprune import __version__
from llmprune.errors import LlmpruneError
from llmprune.service.db import FINISHED, STATUSES, Database
from llmprune.service.layout import Layout
from llmprune.service.ray_jobs import PLACEMENT_TIMEOUT_S, RayScheduler, connect
from llmprune.service.rules import check_recipe
from llmprune.service.scheduler import CANCEL_GRACE_S, STOP_GRACE_S, Scheduler, Slot
from llmprune.service.throttle import Throttle
from llmprune.service.views import job_summary
from llmprune.service.web import COOKIE, CSRF_HEADER, Dashboard, client_of, session_key

SSE_POLL_S = 0.25
STATUS_TTL_S = 0.1  # how stale a polled status may be
AUTH_LIMIT = 20  # wrong tokens a client may send per minute


@dataclass
class Settings:
    workdir: Path
    token: str | None
    models: Sequence[Path] = ()
    data: Sequence[Path] = ()
    slots: list[Slot] = field(default_factory=lambda: [Slot("cpu", 1)])
    max_body: int = 1 << 20
    max_queued: int = 100
    cancel_grace: float = CANCEL_GRACE_S
    stop_grace: float = STOP_GRACE_S
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_placement_timeout: float = PLACEMENT_TIMEOUT_S
    auth_limit: int = AUTH_LIMIT


class Progress(BaseModel):
    stage: str
    done: int
    total: int
    unit: str
    eta: float | None = Field(None, description="when the stage should end (Unix time), from its pace so far")


class JobView(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: Progress | None = None
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    recipe: dict[str, Any]
    result: dict[str, Any] | None = None
    attempts: int = 0
    cancel_requested: bool = False


class JobList(BaseModel):
    jobs: list[JobView]


class Artifact(BaseModel):
    name: str
    bytes: int
    sha256: str


class Artifacts(BaseModel):
    files: list[Artifact]


class Health(BaseModel):
    status: str
    version: str


class Problem(BaseModel):
    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    words = {401: "missing or wrong token", 404: "no such job or file", 409: "not in a state that allows it",
             413: "request body too large", 422: "the recipe or a parameter is refused (detail names the key)",
             429: "too many jobs waiting, or too many wrong tokens from this client (see Retry-After)"}
    return {code: {"model": Problem, "description": words[code]} for code in codes}


def create_app(settings: Settings) -> FastAPI:
    if settings.executor == "ray":  # a cluster that cannot be reached stops the server before anything
        connect(settings.ray_address)
    layout = Layout(settings.workdir)
    layout.create()
    db = Database(layout.database)
    scheduler: Scheduler | RayScheduler
    if settings.executor == "ray":
        scheduler = RayScheduler(layout, db, settings.slots, settings.ray_address,
                                 say=lambda line: print(line, flush=True), cancel_grace=settings.cancel_grace,
                                 placement_timeout=settings.ray_placement_timeout)
    else:
        scheduler = Scheduler(layout, db, settings.slots, say=lambda line: print(line, flush=True),
                              cancel_grace=settings.cancel_grace, stop_grace=settings.stop_grace)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="llmprune", version=__version__, lifespan=lifespan,
                  description="Pruning jobs for a team: submit a recipe, watch it, cancel it, fetch the checkpoint.")
    app.state.settings, app.state.db, app.state.scheduler = settings, db, scheduler
    throttle = Throttle(settings.auth_limit)

    async def authorized(request: Request) -> None:  # async: no thread hand-off per request
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme:  # a token offered: counted when wrong, refused from a client that guessed too often
            client = client_of(request)
            wait = throttle.wait(client)
            if wait:
                raise HTTPException(429, f"too many wrong tokens from {client}: try again in {wait} s",
                                    headers={"Retry-After": str(wait)})
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), settings.token.encode()):
                return
            throttle.failed(client)
        session = request.cookies.get(COOKIE)
        csrf = db.session_csrf(session, session_key(settings.token)) if session and not scheme else None
        if csrf is None:
            raise HTTPException(401, "missing or wrong token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        # A signed-in page: its changes must carry the session's CSRF token (a header no other
        # site can set), on top of the SameSite=Strict cookie.
        if request.method not in ("GET", "HEAD", "OPTIONS") and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), csrf.encode()):
            raise HTTPException(403, "missing or stale CSRF token (X-CSRF-Token) for a signed-in session")

    def found(job_id: str) -> dict[str, Any]:
        job = db.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    guarded = [Depends(authorized)]
    recent: dict[str, tuple[float, bytes]] = {}  # job id -> (when read, the status route's body)

    @app.get("/healthz", response_model=Health)
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.post("/v1/jobs", status_code=201, response_model=JobView, dependencies=guarded,
              responses=_errors(401, 413, 422, 429),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"type": "object", "description": "a recipe: the keys of the YAML recipes"}}}}})
    async def submit(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body:
            raise HTTPException(413, f"request body over {settings.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body:
                raise HTTPException(413, f"request body over {settings.max_body} bytes")
        try:
            recipe = json.loads(body)
        except ValueError as exc:
            raise HTTPException(422, f"the body is not JSON ({exc})") from None
        try:
            confined, _ = check_recipe(recipe, settings.models, settings.data)
        except LlmpruneError as exc:
            raise HTTPException(422, str(exc)) from None
        if db.count("queued") >= settings.max_queued:
            raise HTTPException(429, f"{settings.max_queued} jobs are already waiting; try again later",
                                headers={"Retry-After": "30"})
        return found(db.create(confined))

    @app.get("/v1/jobs", response_model=JobList, dependencies=guarded, responses=_errors(401, 429))
    def list_jobs(status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(None)
                  ) -> dict[str, Any]:
        return {"jobs": db.jobs(status)}

    @app.get("/v1/jobs/{job_id}", response_model=JobView, dependencies=guarded, responses=_errors(401, 404, 429))
    async def get_job(job_id: str) -> Response:
        # The route clients poll: served on the event loop (one indexed SQLite read, no thread
        # hand-off), and a row read in the last STATUS_TTL_S is served again as it was.
        now = time.monotonic()
        hit = recent.get(job_id)
        if hit is None or now - hit[0] > STATUS_TTL_S:
            if len(recent) > 10_000:
                recent.clear()
            hit = (now, json.dumps(found(job_id)).encode())
            recent[job_id] = hit
        return Response(hit[1], media_type="application/json")

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=JobView, dependencies=guarded,
              responses=_errors(401, 404, 429))
    def cancel(job_id: str) -> dict[str, Any]:
        found(job_id)
        db.request_cancel(job_id)
        recent.pop(job_id, None)  # what this server changed is never served stale
        return found(job_id)

    @app.delete("/v1/jobs/{job_id}", status_code=204, dependencies=guarded, responses=_errors(401, 404, 409, 429))
    def delete(job_id: str) -> None:
        job = found(job_id)
        if job["status"] not in FINISHED:
            raise HTTPException(409, f"job {job_id} is {job['status']}; cancel it first")
        layout.remove(job_id)
        db.delete(job_id)
        recent.pop(job_id, None)

    @app.get("/v1/jobs/{job_id}/events", dependencies=guarded,
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}, **_errors(401, 404, 429)})
    async def events(job_id: str, request: Request, follow: bool = Query(True)) -> StreamingResponse:
        """Every progress event and log line of the job, from the start (or after the
        ``Last-Event-ID`` header's event); ``follow=false``: those so far, then the end."""
        found(job_id)
        start = request.headers.get("last-event-id", "0")
        after = int(start) if start.isdigit() else 0

        async def stream() -> AsyncIterator[str]:
            nonlocal after
            while True:
                batch = await asyncio.to_thread(db.events, job_id, after)
                for event in batch:
                    after = event["seq"]
                    payload = json.dumps({**event["data"], "time": event["time"]})
                    yield f"id: {event['seq']}\nevent: {event['kind']}\ndata: {payload}\n\n"
                job = await asyncio.to_thread(db.get, job_id)
                if job is None or (job["status"] in FINISHED and not batch) or not follow:
                    status = job["status"] if job else "deleted"
                    yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/events", dependencies=guarded, response_class=StreamingResponse, include_in_schema=False)
    async def all_events(request: Request, follow: bool = Query(True)) -> StreamingResponse:
        """Every job as a dashboard row (:func:`~llmprune.service.views.job_summary`), once, then
        each again whenever it changes; ``follow=false``: the rows as they are, then the end."""
        async def stream() -> AsyncIterator[str]:
            sent: dict[str, str] = {}
            while True:
                jobs = await asyncio.to_thread(db.jobs)
                for job in reversed(jobs):  # oldest first: a table that prepends keeps newest on top
                    text = json.dumps(job_summary(job))
                    if sent.get(job["id"]) != text:
                        sent[job["id"]] = text
                        yield f"event: job\ndata: {text}\n\n"
                if not follow:
                    yield "event: end\ndata: {}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/artifacts", response_model=Artifacts, dependencies=guarded,
             responses=_errors(401, 404, 409, 429))
    def artifacts(job_id: str) -> dict[str, Any]:
        job = found(job_id)
        files = layout.manifest(job_id)
        if job["status"] != "succeeded" or files is None:
            raise HTTPException(409, f"job {job_id} is {job['status']}; it has no checkpoint")
        return {"files": files}

    @app.get("/v1/jobs/{job_id}/artifacts/{name:path}", dependencies=guarded, response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}}}, **_errors(401, 404, 429)})
    def artifact(job_id: str, name: str) -> FileResponse:
        found(job_id)
        try:
            path = layout.artifact(job_id, name)
        except LlmpruneError as exc:
            raise HTTPException(404, str(exc)) from None
        return FileResponse(path, filename=Path(name).name)

    @app.get("/metrics", dependencies=guarded, response_class=PlainTextResponse, responses=_errors(401, 429))
    def metrics() -> str:
        jobs = db.jobs()
        lines = ["# HELP llmprune_jobs Jobs by status.", "# TYPE llmprune_jobs gauge"]
        lines += [f'llmprune_jobs{{status="{s}"}} {sum(j["status"] == s for j in jobs)}' for s in STATUSES]
        lines += ["# HELP llmprune_queue_length Jobs waiting for a worker.", "# TYPE llmprune_queue_length gauge",
                  f"llmprune_queue_length {sum(j['status'] == 'queued' for j in jobs)}"]
        done = [j["finished"] - j["started"] for j in jobs
                if j["status"] in FINISHED and j["started"] and j["finished"]]
        lines += ["# HELP llmprune_job_seconds Wall time of finished jobs.", "# TYPE llmprune_job_seconds summary",
                  f"llmprune_job_seconds_count {len(done)}", f"llmprune_job_seconds_sum {sum(done):.3f}"]
        return "\n".join(lines) + "\n"

    Dashboard(app, db, layout, settings.token, settings.models, settings.data, settings.max_body, settings.max_queued,
              throttle)
    return app
