"""Where the service keeps things under its workdir, and the files a finished job offers.

    WORKDIR/service.db            jobs and their events (SQLite, WAL)
    WORKDIR/jobs/ID/out/          the published checkpoint
    WORKDIR/jobs/ID/artifacts.json  every file of it: name, bytes, sha256
    WORKDIR/jobs/ID/worker.log    the worker's own output (a crash's traceback lands here)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.io.activations import file_sha256


class Layout:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self.database = self.workdir / "service.db"
        self.jobs = self.workdir / "jobs"

    def create(self) -> None:
        self.jobs.mkdir(parents=True, exist_ok=True)

    def job(self, job_id: str) -> Path:
        return self.jobs / job_id

    def out(self, job_id: str) -> Path:
        return self.job(job_id) / "out"

    def write_manifest(self, job_id: str) -> list[dict[str, Any]]:
        """List (and hash) every regular file of the published folder; links are not offered."""
        out = self.out(job_id)
        files = []
        for path in sorted(out.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            files.append({"name": path.relative_to(out).as_posix(), "bytes": path.stat().st_size,
                          "sha256": file_sha256(path)})
        target = self.job(job_id) / "artifacts.json"
        partial = target.with_suffix(".partial")
        partial.write_text(json.dumps({"files": files}, indent=1))
        os.replace(partial, target)
        return files

    def manifest(self, job_id: str) -> list[dict[str, Any]] | None:
        path = self.job(job_id) / "artifacts.json"
        if not path.is_file():
            return None
        files: list[dict[str, Any]] = json.loads(path.read_text())["files"]
        return files

    def artifact(self, job_id: str, name: str) -> Path:
        """The file ``name`` of the job's checkpoint: only a name its manifest lists, and only
        a path that stays inside the folder once every link is followed."""
        files = self.manifest(job_id) or []
        if name not in {f["name"] for f in files}:
            raise LlmpruneError(f"job {job_id} has no file {name!r}")
        out = self.out(job_id).resolve()
        path = (out / name).resolve()
        if not path.is_relative_to(out) or not path.is_file():
            raise LlmpruneError(f"job {job_id} has no file {name!r}")
        return path

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job(job_id), ignore_errors=True)
