"""Job state in SQLite (WAL) under the service's workdir: everything a restart must not lose.

Each call opens its own short connection, so the server's threads and the worker processes
share the file safely (SQLite's locking, a busy timeout for the moments one of them writes).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, recipe TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, error TEXT,
    stage TEXT, done INTEGER, total INTEGER, unit TEXT, result TEXT,
    cancel INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, pid INTEGER, eta REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created);
CREATE TABLE IF NOT EXISTS sessions (
    digest TEXT PRIMARY KEY, csrf TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL, key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (job, seq)
);
"""
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
COLUMNS = {"status", "started", "finished", "error", "stage", "done", "total", "unit", "result", "cancel", "pid",
           "eta"}
ADDED = {"eta": "REAL"}  # columns newer than the first schema: added to an older workdir's database


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED.items():
                if name not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        # WAL with NORMAL sync survives any process crash (a kill -9 loses nothing committed);
        # only a power cut may drop the last commits. FULL would fsync every progress event.
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield db
        finally:
            db.close()

    # -- jobs ---------------------------------------------------------------------------------
    def create(self, recipe: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex[:16]
        with self.connect() as db:
            db.execute("INSERT INTO jobs (id, status, recipe, created) VALUES (?, 'queued', ?, ?)",
                       (job_id, json.dumps(recipe), time.time()))
        return job_id

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        with self.connect() as db:
            if status is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY created DESC, rowid DESC").fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY created DESC, rowid DESC",
                                  (status,)).fetchall()
        return [_job(r) for r in rows]

    def count(self, status: str) -> int:
        with self.connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0])

    def claim(self) -> dict[str, Any] | None:
        """The oldest queued job, now running (atomically: one claimer wins)."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created, rowid LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, error = NULL "
                       "WHERE id = ?", (time.time(), row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"])

    def update(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        unknown = set(fields) - COLUMNS
        if unknown:  # the column names go into the SQL text: only ours
            raise ValueError(f"no job column {sorted(unknown)[0]}")
        names = ", ".join(f"{name} = ?" for name in fields)
        values = [json.dumps(v) if name == "result" and v is not None else v for name, v in fields.items()]
        with self.connect() as db:
            db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*values, job_id))

    def finish(self, job_id: str, status: str, error: str | None = None, result: Any = None) -> bool:
        """Mark a running (or queued) job finished; False if it already was."""
        with self.connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, error = ?, result = COALESCE(?, result), finished = ?, pid = NULL, "
                "eta = NULL "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (status, error, json.dumps(result) if result is not None else None, time.time(), job_id))
            return cursor.rowcount == 1

    def requeue(self, job_id: str) -> bool:
        """A running job back to the queue (its worker was stopped); False if it was not running."""
        with self.connect() as db:
            cursor = db.execute("UPDATE jobs SET status = 'queued', pid = NULL, eta = NULL "
                                "WHERE id = ? AND status = 'running'", (job_id,))
            return cursor.rowcount == 1

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel: a queued job is dropped at once, a running one is flagged. The status after."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
            elif row["status"] == "running":
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
            db.execute("COMMIT")
            return str(db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()["status"])

    def cancel_requested(self, job_id: str) -> bool:
        with self.connect() as db:
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row is not None and row["cancel"])

    def requeue_running(self) -> list[str]:
        """After a restart: jobs left running by a dead server go back to the queue (a cancel
        asked before the crash is honoured now)."""
        with self.connect() as db:
            rows = db.execute("SELECT id, cancel FROM jobs WHERE status = 'running'").fetchall()
            for row in rows:
                if row["cancel"]:
                    db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, pid = NULL WHERE id = ?",
                               (time.time(), row["id"]))
                else:
                    db.execute("UPDATE jobs SET status = 'queued', pid = NULL WHERE id = ?", (row["id"],))
        return [r["id"] for r in rows if not r["cancel"]]

    def delete(self, job_id: str) -> None:
        with self.connect() as db:
            db.execute("DELETE FROM events WHERE job = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # -- dashboard sessions ---------------------------------------------------------------------
    # Only a digest of each session id is stored: the database file does not sign anyone in.
    # ``key`` fingerprints the token a session was opened with: a new token closes every session.
    def start_session(self, lifetime: float, key: str) -> tuple[str, str]:
        """A new browser session: (its id, for the cookie; its CSRF token, for the page)."""
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = time.time()
        with self.connect() as db:
            db.execute("DELETE FROM sessions WHERE expires < ? OR key != ?", (now, key))
            db.execute("INSERT INTO sessions (digest, csrf, created, expires, key) VALUES (?, ?, ?, ?, ?)",
                       (_digest(session), csrf, now, now + lifetime, key))
        return session, csrf

    def session_csrf(self, session: str, key: str) -> str | None:
        """The CSRF token of a live session opened under ``key``; None for any other."""
        with self.connect() as db:
            row = db.execute("SELECT csrf FROM sessions WHERE digest = ? AND expires >= ? AND key = ?",
                             (_digest(session), time.time(), key)).fetchone()
        return str(row["csrf"]) if row is not None else None

    def end_session(self, session: str) -> None:
        with self.connect() as db:
            db.execute("DELETE FROM sessions WHERE digest = ?", (_digest(session),))

    # -- events -------------------------------------------------------------------------------
    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job = ?", (job_id,)).fetchone()[0]
            db.execute("INSERT INTO events (job, seq, time, kind, data) VALUES (?, ?, ?, ?, ?)",
                       (job_id, seq, time.time(), kind, json.dumps(data)))
            db.execute("COMMIT")

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        with self.connect() as db:
            rows = db.execute("SELECT seq, time, kind, data FROM events WHERE job = ? AND seq > ? ORDER BY seq",
                              (job_id, after)).fetchall()
        return [{"seq": r["seq"], "time": r["time"], "kind": r["kind"], "data": json.loads(r["data"])} for r in rows]


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


def _job(row: sqlite3.Row) -> dict[str, Any]:
    progress = None
    if row["stage"] is not None:
        progress = {"stage": row["stage"], "done": row["done"], "total": row["total"], "unit": row["unit"],
                    "eta": row["eta"]}
    return {"id": row["id"], "status": row["status"], "progress": progress, "created": row["created"],
            "started": row["started"], "finished": row["finished"], "error": row["error"],
            "recipe": json.loads(row["recipe"]), "result": json.loads(row["result"]) if row["result"] else None,
            "attempts": row["attempts"], "cancel_requested": bool(row["cancel"])}
