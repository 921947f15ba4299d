"""The dashboard: server-rendered pages over the same database and checks as the HTTP API.

Signing in exchanges the service token for a session cookie (HttpOnly, SameSite=Strict; only a
digest of it is stored), so the token never appears in a URL, a page or the browser's storage.
Every state-changing form carries the session's CSRF token, and the page's own API calls send
it as ``X-CSRF-Token``. The lists and the job page are complete without JavaScript; the small
script in ``static/`` only keeps them live from the events streams.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, Undefined, select_autoescape

from llmprune.errors import LlmpruneError
from llmprune.io.data import BUILTIN
from llmprune.io.loading import BUILTIN_MODELS
from llmprune.service import charts
from llmprune.service.db import FINISHED, STATUSES, Database
from llmprune.service.layout import Layout
from llmprune.service.rules import check_recipe
from llmprune.service.throttle import Throttle
from llmprune.service.views import job_summary

COOKIE = "llmprune_session"
SESSION_LIFETIME_S = 12 * 3600
CSRF_HEADER = "x-csrf-token"
METHODS = ("sparsegpt", "wanda", "ria", "magnitude", "admm", "obd", "taylor")
PATTERNS = ("unstructured", "2:4", "4:8")
# Form field -> the recipe key its errors name.
FIELDS = {"model": "model", "method": "prune.method", "pattern": "prune.pattern", "sparsity": "prune.sparsity",
          "calibration": "calibration.source", "samples": "calibration.samples", "seqlen": "calibration.seqlen",
          "evaluation": "evaluation.source", "windows": "evaluation.windows"}


def session_key(token: str | None) -> str:
    """What ties a session to the token it was opened with (a digest, never the token)."""
    return "open" if token is None else hashlib.sha256(b"llmprune-session\0" + token.encode()).hexdigest()


def client_of(request: Request) -> str:
    """The client's address: behind a proxy trusted by ``--forwarded-allow-ips``, the one it forwards."""
    return request.client.host if request.client else "unknown"


class PageError(Exception):
    """A refused page request, shown as a page (not JSON) to the person who made it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NoAliases(yaml.SafeLoader):
    """YAML without anchors' aliases: a few bytes of ``*a`` references can expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not accepted in a submitted recipe")
        return super().compose_node(parent, index)


def _missing(value: Any) -> bool:
    return value is None or isinstance(value, Undefined)


def field_of(message: str) -> str:
    """The form field an error from the recipe checks is about ("recipe" when none is named)."""
    keys = {key: name for name, key in FIELDS.items()}
    named = re.match(r"^(?:recipe key )?([a-z_]+(?:\.[a-z_]+)?)[: ]", message)
    if named and named.group(1) in keys:
        return keys[named.group(1)]
    found = re.match(r"^(?:[^,:]+, )?([a-z_]+): (.*)$", message)
    if found:
        section, rest = found.groups()
        for key, name in keys.items():
            head, _, leaf = key.partition(".")
            if head == section and leaf and re.search(rf"\b{leaf}\b", rest):
                return name
        if section in keys:
            return keys[section]
    return "recipe"


class Dashboard:
    def __init__(self, app: FastAPI, db: Database, layout: Layout, token: str | None, models: Sequence[Path],
                 data: Sequence[Path], max_body: int, max_queued: int, throttle: Throttle) -> None:
        self.db, self.layout, self.token, self.key = db, layout, token, session_key(token)
        self.throttle = throttle
        self.models, self.data, self.max_body, self.max_queued = models, data, max_body, max_queued
        self.templates = Environment(loader=PackageLoader("llmprune.service", "templates"),
                                     autoescape=select_autoescape(default=True))
        self.templates.filters["number"] = lambda v, digits=2: "–" if _missing(v) else f"{v:.{digits}f}"
        self.templates.filters["percent"] = lambda v: "–" if _missing(v) else f"{100 * v:.1f}%"
        self.templates.filters["seconds"] = _seconds
        self.templates.filters["when"] = _when
        app.mount("/static", StaticFiles(packages=[("llmprune.service", "static")]), name="static")

        @app.exception_handler(PageError)
        async def refused(request: Request, exc: PageError) -> Response:
            return self.page("error.html", exc.status, csrf=None, message=str(exc))

        self.routes(app)

    # -- sessions -----------------------------------------------------------------------------
    def csrf(self, request: Request) -> str | None:
        """The CSRF token of the request's live session; None when it has none."""
        session = request.cookies.get(COOKIE)
        return self.db.session_csrf(session, self.key) if session else None

    def check_form(self, request: Request, form: dict[str, str]) -> str:
        """A state-changing form: a live session and its CSRF token, from this site."""
        csrf = self.csrf(request)
        if csrf is None:
            raise PageError(401, "your session has ended (or never began): sign in again, then repeat this")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise PageError(403, "a request from another site was refused")
        if not hmac.compare_digest(form.get("csrf", "").encode(), csrf.encode()):
            raise PageError(403, "the form's CSRF token is missing or stale; reload the page and try again")
        return csrf

    async def form(self, request: Request) -> dict[str, str]:
        """A url-encoded form, read up to ``max_body`` bytes (refused beyond, before reading it all)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise PageError(413, f"the form is over {self.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise PageError(413, f"the form is over {self.max_body} bytes")
        return {k: v[-1] for k, v in parse_qs(body.decode(errors="replace"), keep_blank_values=True).items()}

    def signed_in(self, request: Request) -> tuple[str, str | None] | Response:
        """(the session's CSRF token, a new session's id to set as the cookie, if one began), or
        the response that sends the browser to sign in. With no token configured the service is
        open: a session starts on the first page."""
        csrf = self.csrf(request)
        if csrf is not None:
            return csrf, None
        if self.token is None:
            session, csrf = self.db.start_session(SESSION_LIFETIME_S, self.key)
            return csrf, session
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/signin?next={quote(target)}", status_code=303)

    def start(self, request: Request, response: Response) -> None:
        session, _ = self.db.start_session(SESSION_LIFETIME_S, self.key)
        self.set_cookie(request, response, session)

    def set_cookie(self, request: Request, response: Response, session: str) -> None:
        response.set_cookie(COOKIE, session, max_age=SESSION_LIFETIME_S, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")

    def page(self, name: str, status_code: int = 200, request: Request | None = None, session: str | None = None,
             **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(statuses=STATUSES, **context)
        response = HTMLResponse(html, status_code=status_code,
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                                "style-src 'self'; frame-ancestors 'none'",
                                     "X-Content-Type-Options": "nosniff"})
        if session is not None and request is not None:
            self.set_cookie(request, response, session)
        return response

    # -- what the pages show ------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        found = list(BUILTIN_MODELS)
        for root in self.models:
            if root.is_dir():
                found += sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        return found

    def text_choices(self) -> list[str]:
        found = list(BUILTIN)
        for root in self.data:
            if root.is_dir():
                found += sorted(p.name for p in root.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        return found

    def record(self, job_id: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self.layout.artifact(job_id, "llmprune.json").read_text())
        except (LlmpruneError, OSError, ValueError):
            return None
        return record

    def card(self, job_id: str) -> str | None:
        from markdown_it import MarkdownIt

        try:
            text = self.layout.artifact(job_id, "README.md").read_text()
        except (LlmpruneError, OSError):
            return None
        text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.DOTALL)  # the Hub's YAML header
        return str(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))

    def compared(self, group: str | None) -> tuple[list[str], str | None, str]:
        """The finished jobs of one base model measured one way (same text and windows), as
        the sweep plot; (every such group, the one shown, its SVG)."""
        done = [job_summary(j) for j in self.db.jobs("succeeded")]
        groups = sorted({s["group"] for s in done})
        chosen = group if group in groups else (groups[0] if groups else None)
        jobs = [s for s in done if s["group"] == chosen]
        dense = next((s["ppl_dense"] for s in jobs if s["ppl_dense"] is not None), None)
        return groups, chosen, charts.render(charts.perplexity_against_sparsity(jobs, dense))

    # -- routes -------------------------------------------------------------------------------
    def routes(self, app: FastAPI) -> None:
        @app.get("/signin", response_class=HTMLResponse, include_in_schema=False)
        def signin_page(request: Request, next: str = "/") -> Response:
            return self.page("signin.html", next=_local(next), error=None, open=self.token is None)

        @app.post("/signin", include_in_schema=False)
        async def signin(request: Request) -> Response:
            form = await self.form(request)
            target = _local(form.get("next", "/"))
            given = form.get("token", "")
            if self.token is not None:
                client = client_of(request)
                wait = self.throttle.wait(client)
                if wait:  # before the comparison: a blocked guesser learns nothing from the answer
                    refused = self.page("signin.html", 429, next=target, open=False,
                                        error=f"too many wrong tokens from {client}: try again in {wait} s")
                    refused.headers["Retry-After"] = str(wait)
                    return refused
                if not hmac.compare_digest(given.encode(), self.token.encode()):
                    self.throttle.failed(client)
                    return self.page("signin.html", 401, next=target, error="wrong token", open=False)
            old = request.cookies.get(COOKIE)
            if old:  # signing in again ends the session the browser had
                self.db.end_session(old)
            response = RedirectResponse(target, status_code=303)
            self.start(request, response)
            return response

        @app.post("/signout", include_in_schema=False)
        async def signout(request: Request) -> Response:
            self.check_form(request, await self.form(request))
            self.db.end_session(request.cookies.get(COOKIE, ""))
            response = RedirectResponse("/signin", status_code=303)
            response.delete_cookie(COOKIE, path="/")
            return response

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        def jobs_page(request: Request, status: str | None = None) -> Response:
            access = self.signed_in(request)
            if isinstance(access, Response):
                return access
            csrf, session = access
            chosen = status if status in STATUSES else None
            rows = [job_summary(j) for j in self.db.jobs(chosen)]
            return self.page("jobs.html", request=request, session=session, csrf=csrf, jobs=rows, status=chosen)

        @app.get("/submit", response_class=HTMLResponse, include_in_schema=False)
        def submit_page(request: Request) -> Response:
            access = self.signed_in(request)
            if isinstance(access, Response):
                return access
            csrf, session = access
            response = self.submit_form(csrf, {}, None, 200)
            if session is not None:
                self.set_cookie(request, response, session)
            return response

        @app.post("/submit", include_in_schema=False)
        async def submit(request: Request) -> Response:
            form = await self.form(request)
            csrf = self.check_form(request, form)
            from_yaml = bool(form.get("recipe", "").strip())
            try:
                recipe = self.recipe_of(form)
                confined, _ = check_recipe(recipe, self.models, self.data)
            except LlmpruneError as exc:
                return self.submit_form(csrf, form, ("recipe" if from_yaml else field_of(str(exc)), str(exc)), 422)
            if self.db.count("queued") >= self.max_queued:
                message = f"{self.max_queued} jobs are already waiting; try again later"
                return self.submit_form(csrf, form, ("recipe", message), 429)
            job_id = self.db.create(confined)
            return RedirectResponse(f"/jobs/{job_id}", status_code=303)

        @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
        def job_page(request: Request, job_id: str) -> Response:
            access = self.signed_in(request)
            if isinstance(access, Response):
                return access
            csrf, session = access
            job = self.db.get(job_id)
            if job is None:
                return self.page("error.html", 404, request=request, session=session, csrf=csrf,
                                 message=f"there is no job {job_id}")
            record = self.record(job_id) if job["status"] == "succeeded" else None
            chart = charts.render(charts.layer_errors(record.get("layers") or [])) if record else None
            return self.page("job.html", request=request, session=session, csrf=csrf, job=job,
                             summary=job_summary(job), record=record, chart=chart,
                             card=self.card(job_id) if record else None,
                             files=self.layout.manifest(job_id) if job["status"] == "succeeded" else None,
                             log=[e for e in self.db.events(job_id) if e["kind"] == "log"],
                             finished=job["status"] in FINISHED, recipe=yaml.safe_dump(job["recipe"], sort_keys=False))

        @app.post("/jobs/{job_id}/cancel", include_in_schema=False)
        async def cancel(request: Request, job_id: str) -> Response:
            self.check_form(request, await self.form(request))
            if self.db.request_cancel(job_id) is None:
                raise PageError(404, f"there is no job {job_id}")
            return RedirectResponse(f"/jobs/{job_id}", status_code=303)

        @app.get("/compare", response_class=HTMLResponse, include_in_schema=False)
        def compare_page(request: Request, group: str | None = None) -> Response:
            access = self.signed_in(request)
            if isinstance(access, Response):
                return access
            csrf, session = access
            groups, chosen, svg = self.compared(group)
            return self.page("compare.html", request=request, session=session, csrf=csrf, groups=groups,
                             chosen=chosen, svg=svg)

        @app.get("/compare.svg", include_in_schema=False)
        def compare_svg(request: Request, group: str | None = None) -> Response:
            if self.csrf(request) is None:
                raise HTTPException(401, "sign in first")
            return Response(self.compared(group)[2], media_type="image/svg+xml",
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                     "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    def submit_form(self, csrf: str, form: dict[str, str], error: tuple[str, str] | None, code: int) -> Response:
        values = {"model": next(iter(list(BUILTIN_MODELS)), ""), "method": "sparsegpt",
                  "pattern": "unstructured", "sparsity": "0.5", "calibration": "wikipedia", "samples": "128",
                  "seqlen": "2048", "evaluation": "wikipedia", "windows": "16", "recipe": ""}
        values.update({k: v for k, v in form.items() if k in values})
        return self.page("submit.html", code, csrf=csrf, values=values, error=error, models=self.model_choices(),
                         texts=self.text_choices(), methods=METHODS, patterns=PATTERNS)

    def recipe_of(self, form: dict[str, str]) -> Any:
        """The recipe a submitted form asks for: its YAML box when filled, else its fields."""
        text = form.get("recipe", "").strip()
        if text:
            try:
                return yaml.load(text, Loader=NoAliases)
            except yaml.YAMLError as exc:
                raise LlmpruneError(f"the recipe is not valid YAML: {str(exc).splitlines()[0]}") from None
            except RecursionError:
                raise LlmpruneError("the recipe nests too deeply") from None
        pattern = form.get("pattern", "unstructured")
        prune: dict[str, Any] = {"method": form.get("method", "sparsegpt"), "pattern": pattern}
        if pattern == "unstructured":
            prune["sparsity"] = _number(form.get("sparsity", ""))
        recipe: dict[str, Any] = {
            "model": form.get("model", ""), "prune": prune,
            "calibration": {"source": form.get("calibration", ""), "samples": _number(form.get("samples", "")),
                            "seqlen": _number(form.get("seqlen", ""))}}
        if form.get("evaluation", "none") == "none":
            recipe["evaluation"] = {"source": None}
        else:
            recipe["evaluation"] = {"source": form["evaluation"], "windows": _number(form.get("windows", ""))}
        return recipe


def _number(text: str) -> Any:
    """A form's number as a number; anything else as given, for the recipe checks to name."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _local(target: str) -> str:
    """Where to go after signing in: a path of this site only, never another host."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.1f} min"


def _when(value: float | None) -> str:
    import time

    return "–" if value is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
