"""A client of the service's API (what ``llmprune submit/status/logs/cancel/fetch`` use)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from llmprune.errors import LlmpruneError

DEFAULT_SERVER = "http://127.0.0.1:8600"


class Client:
    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.server = (server or os.environ.get("LLMPRUNE_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token if token is not None else os.environ.get("LLMPRUNE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LlmpruneError(f"cannot reach the llmprune server at {self.server}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            text = detail if isinstance(detail, str) else json.dumps(detail)
            raise LlmpruneError(f"server: {response.status_code} {text}")
        return response

    def submit(self, recipe: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/v1/jobs", json=recipe).json()
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}").json()
        return result

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        result: list[dict[str, Any]] = self.request("GET", "/v1/jobs", params=params).json()["jobs"]
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/cancel").json()
        return result

    def events(self, job_id: str, after: int = 0, follow: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind, data) of every event of the job from the start; ``follow``: until it finishes,
        else those so far. The last is ("end", {"status": ...})."""
        headers = {"Last-Event-ID": str(after)} if after else {}
        params = {} if follow else {"follow": "false"}
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params,
                                  timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    raise LlmpruneError(f"server: {response.status_code} {response.text}")
                kind, data = "message", ""
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        yield kind, json.loads(data)
                        kind, data = "message", ""
        except httpx.HTTPError as exc:
            raise LlmpruneError(f"lost the event stream of job {job_id}: {exc}") from None

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The finished checkpoint's files: name, bytes, sha256."""
        files: list[dict[str, Any]] = self.request("GET", f"/v1/jobs/{job_id}/artifacts").json()["files"]
        return files

    def fetch(self, job_id: str, dest: Path) -> list[dict[str, Any]]:
        """Download the job's checkpoint folder to ``dest`` (which must not exist), every file
        checked against the SHA-256 the server listed; ``dest`` appears only when all are."""
        if dest.exists():
            raise LlmpruneError(f"{dest} already exists; give a new folder")
        files = self.artifacts(job_id)
        partial = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for item in files:
                name = PurePosixPath(item["name"])
                if name.is_absolute() or ".." in name.parts:
                    raise LlmpruneError(f"server listed a file outside the folder: {item['name']!r}")
                target = partial.joinpath(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", timeout=None) as response:
                    if response.status_code != 200:
                        raise LlmpruneError(f"server: {response.status_code} for {name}")
                    with open(target, "wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                if digest.hexdigest() != item["sha256"]:
                    raise LlmpruneError(f"{name}: SHA-256 differs from the server's list; the download is damaged")
            partial.rename(dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return files
