"""The service, for real: `llmprune serve` in a subprocess on a loopback port, its worker
processes, SQLite under a temporary workdir, and the real client (HTTP and the CLI)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from llmprune.service.client import Client

TOKEN = "t0k3n-for-tests-only"
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    workdir: Path
    process: subprocess.Popen[bytes]
    args: list[str]

    def client(self, token: str | None = TOKEN) -> Client:
        return Client(self.url, token=token)

    def http(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def start(workdir: Path, models: Path, data: Path, *extra: str, port: int | None = None,
          env: dict[str, str] | None = None) -> Server:
    port = port or free_port()
    args = [sys.executable, "-m", "llmprune.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workdir", str(workdir), "--models-dir", str(models), "--data-dir", str(data), "--threads", "1", *extra]
    log = open(workdir.parent / f"{workdir.name}-server.log", "ab")  # noqa: SIM115 (lives with the server)
    process = subprocess.Popen(args, env={**os.environ, "LLMPRUNE_TOKEN": TOKEN, **(env or {})}, stdout=log,
                               stderr=subprocess.STDOUT,
                               start_new_session=True)  # its own process group: the tests kill it whole
    server = Server(f"http://127.0.0.1:{port}", workdir, process, args)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir.parent / f"{workdir.name}-server.log").read_text()
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


def stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(scope="module")
def roots(tmp_path_factory, llama_dir, text_file) -> tuple[Path, Path]:
    return llama_dir.parent, text_file.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory, roots) -> Iterator[Server]:
    live = start(tmp_path_factory.mktemp("service") / "work", *roots, "--max-queued", "3", "--max-body", "4096",
                 "--cancel-grace", "2")
    yield live
    stop(live)


def recipe(llama_dir: Path, text_file: Path, **extra) -> dict:
    return {"model": str(llama_dir), "prune": {"method": "sparsegpt", "sparsity": 0.5},
            "calibration": {"source": str(text_file), "samples": 4, "seqlen": 32},
            "evaluation": {"source": str(text_file), "seqlen": 32, "windows": 2}, **extra}


def wait(client: Client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def direct_run(llama_dir: Path, text_file: Path, out: Path) -> dict[str, torch.Tensor]:
    """The same recipe through the CLI, one thread, as the server's worker runs it."""
    spec = out.parent / "recipe.json"
    spec.write_text(json.dumps({**recipe(llama_dir, text_file), "out": str(out)}))
    subprocess.run([sys.executable, "-m", "llmprune.cli", "--recipe", str(spec), "--threads", "1", "--device", "cpu",
                    "--quiet"], check=True, capture_output=True, timeout=300)
    return tensors(out)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def test_health_needs_no_token_and_everything_else_does(server):
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    for token in (None, "wrong", TOKEN + "x"):
        with server.http(token) as http:
            for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                                 ("GET", "/metrics"), ("GET", "/openapi.json/../v1/jobs")):
                response = http.request(method, path)
                assert response.status_code == 401, (token, path)
                assert TOKEN not in response.text


def test_a_job_runs_to_the_checkpoint_a_direct_run_writes(server, llama_dir, text_file, tmp_path):
    client = server.client()
    job = client.submit(recipe(llama_dir, text_file))
    assert job["status"] == "queued"
    done = wait(client, job["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["sparsity_achieved"] > 0.3 and result["ppl_pruned"] > result["ppl_dense"] > 1
    kinds = [kind for kind, _ in client.events(job["id"])]
    stages = {data["stage"] for kind, data in client.events(job["id"]) if kind == "progress"}
    assert kinds[-1] == "end" and {"load", "calibrate", "prune", "save"} <= stages
    fetched = tmp_path / "fetched"
    files = client.fetch(job["id"], fetched)
    for item in files:
        assert hashlib.sha256((fetched / item["name"]).read_bytes()).hexdigest() == item["sha256"]
    expected = direct_run(llama_dir, text_file, tmp_path / "direct")
    actual = tensors(fetched)
    assert set(actual) == set(expected) and all(torch.equal(actual[k], expected[k]) for k in expected)
    assert job["id"] in [j["id"] for j in client.jobs("succeeded")]
    assert 'llmprune_jobs{status="succeeded"}' in server.http().get("/metrics").text


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"prune": {"method": "sparsegpt", "sparsty": 0.5}}, 422, "did you mean prune.sparsity"),
    ({"modle": "x"}, 422, "did you mean model"),
    ({"prune": {"method": "sparsegpt", "sparsity": 2}}, 422, "sparsity"),
    ({"out": "/tmp/anywhere"}, 422, "recipe key out is not accepted"),
    ({"offload_dir": "/tmp/x"}, 422, "offload_dir"),
    ({"device": "cuda:7"}, 422, "device"),
    ({"model": "/etc"}, 422, "not a model folder under the service's folders"),
    ({"model": "../../../../etc"}, 422, "model"),
    ({"model": "~/models/x"}, 422, "model"),
    ({"calibration": {"source": "/etc/passwd", "samples": 4, "seqlen": 32}}, 422, "calibration.source"),
    ({"evaluation": {"source": "../../../../etc/hostname"}}, 422, "evaluation.source"),
    ({"tasks": {"names": ["x"], "include": "/etc"}}, 422, "tasks.include"),
])
def test_bad_recipes_are_refused_naming_the_key(server, llama_dir, text_file, change, status, words):
    body = {**recipe(llama_dir, text_file), **change}
    with server.http() as http:
        before = len(http.get("/v1/jobs").json()["jobs"])
        response = http.post("/v1/jobs", json=body)
        assert response.status_code == status
        assert words in response.json()["detail"]
        assert len(http.get("/v1/jobs").json()["jobs"]) == before  # nothing queued


def test_a_symlink_out_of_the_models_folder_is_refused(server, roots, tmp_path, llama_dir, text_file):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = roots[0] / "escape"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with server.http() as http:
            response = http.post("/v1/jobs", json={**recipe(llama_dir, text_file), "model": str(link)})
            assert response.status_code == 422 and "model" in response.json()["detail"]
    finally:
        link.unlink()


def test_body_too_large_and_not_json(server):
    with server.http() as http:
        assert http.post("/v1/jobs", content=b"{" + b" " * 5000 + b"}",
                         headers={"Content-Type": "application/json"}).status_code == 413
        garbage = http.post("/v1/jobs", content=b"not json", headers={"Content-Type": "application/json"})
        assert garbage.status_code == 422


def test_artifact_names_cannot_leave_the_job_folder(server, llama_dir, text_file):
    client = server.client()
    job = wait(client, client.submit(recipe(llama_dir, text_file))["id"])
    assert job["status"] == "succeeded"
    secret = server.workdir / "service.db"
    with server.http() as http:
        listed = http.get(f"/v1/jobs/{job['id']}/artifacts").json()["files"]
        assert "config.json" in {f["name"] for f in listed}
        ok = http.get(f"/v1/jobs/{job['id']}/artifacts/config.json")
        assert ok.status_code == 200 and json.loads(ok.content)
        ranged = http.get(f"/v1/jobs/{job['id']}/artifacts/config.json", headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 206 and ranged.content == ok.content[:10]
        for name in ("../artifacts.json", "..%2F..%2Fservice.db", "%2e%2e/%2e%2e/service.db", str(secret),
                     "/etc/passwd", "out/../../service.db"):
            response = http.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
            assert response.status_code in (404, 400), name
            assert response.content != secret.read_bytes()[:len(response.content)] or not response.content


def test_a_link_planted_in_the_output_is_never_served(server, llama_dir, text_file):
    client = server.client()
    job = wait(client, client.submit(recipe(llama_dir, text_file))["id"])
    out = server.workdir / "jobs" / job["id"] / "out"
    (out / "leak.json").symlink_to(server.workdir / "service.db")
    with server.http() as http:
        assert http.get(f"/v1/jobs/{job['id']}/artifacts/leak.json").status_code == 404


def test_cancel_queued_and_running_jobs_and_the_queue_limit(server, llama_dir, text_file):
    client = server.client()
    slow = recipe(llama_dir, text_file, calibration={"source": str(text_file), "samples": 64, "seqlen": 64},
                  evaluation={"source": str(text_file), "seqlen": 64, "windows": 40})
    running = client.submit(slow)["id"]
    wait(client, running, ("running",), timeout=60)
    queued = [client.submit(recipe(llama_dir, text_file))["id"] for _ in range(3)]
    with server.http() as http:
        refused = http.post("/v1/jobs", json=recipe(llama_dir, text_file))
        assert refused.status_code == 429
    assert client.cancel(queued[0])["status"] == "cancelled"
    tick = time.monotonic()
    client.cancel(running)
    job = wait(client, running, timeout=60)
    assert job["status"] == "cancelled" and time.monotonic() - tick < 30
    assert not (server.workdir / "jobs" / running / "out").exists()
    for job_id in queued[1:]:
        client.cancel(job_id)
    assert all(wait(client, j)["status"] in ("cancelled", "succeeded") for j in queued[1:])


def test_a_killed_worker_fails_its_job_and_the_server_keeps_serving(server, llama_dir, text_file):
    client = server.client()
    slow = recipe(llama_dir, text_file, evaluation={"source": str(text_file), "seqlen": 64, "windows": 60})
    job_id = client.submit(slow)["id"]
    deadline = time.monotonic() + 60
    while not client.job(job_id)["progress"] and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = worker_pid(server, job_id)
    os.kill(pid, signal.SIGKILL)
    job = wait(client, job_id)
    assert job["status"] == "failed" and "SIGKILL" in job["error"]
    again = wait(client, client.submit(recipe(llama_dir, text_file))["id"])
    assert again["status"] == "succeeded"


def worker_pid(server: Server, job_id: str) -> int:
    """The job's worker process (a job is marked running just before its worker starts)."""
    import sqlite3

    deadline = time.monotonic() + 30
    while True:
        with sqlite3.connect(server.workdir / "service.db") as db:
            pid = db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        if pid is not None:
            return int(pid)
        assert time.monotonic() < deadline, f"job {job_id} has no worker process"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def four_layers(roots, tokenizer) -> Path:
    import tiny

    folder = roots[0] / "four"
    if not folder.exists():
        tiny.llama(len(tokenizer), layers=4).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def streamed(model: Path, text_file: Path) -> dict:
    return {**recipe(model, text_file, calibration={"source": str(text_file), "samples": 128, "seqlen": 64}),
            "stream": "on"}


def test_a_killed_server_resumes_its_streamed_job_and_two_workers_run_at_once(
        tmp_path, roots, four_layers, llama_dir, text_file, streamed_direct):
    """SIGKILL to the server's whole process group (workers included) in the middle of a
    streamed job; the restarted server on the same workdir resumes the job from its journal,
    which ends with the checkpoint a direct run writes. With --workers 2, two jobs run at once."""
    workdir = tmp_path / "work"
    first = start(workdir, *roots, "--workers", "2")
    try:
        client = first.client()
        job_id = client.submit(streamed(four_layers, text_file))["id"]
        other = client.submit(recipe(llama_dir, text_file, evaluation={"source": str(text_file), "seqlen": 64,
                                                                        "windows": 40}))["id"]
        deadline = time.monotonic() + 120
        both = False
        while time.monotonic() < deadline:
            rows = {j["id"]: j for j in client.jobs()}
            both = both or all(rows[j]["status"] == "running" for j in (job_id, other))
            progress = rows[job_id]["progress"] or {}
            if progress.get("stage") == "prune" and progress.get("done", 0) >= 1:
                break
            time.sleep(0.05)
        assert both, "the two jobs never ran at the same time"
        assert (client.job(job_id)["progress"] or {}).get("stage") == "prune"
    finally:
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait()
    second = start(workdir, *roots, "--workers", "2")
    try:
        client = second.client()
        job = wait(client, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2
        messages = [d.get("message", "") for kind, d in client.events(job_id) if kind == "log"]
        assert any(m.startswith("resuming from") for m in messages)
        expected, actual = streamed_direct, tensors(workdir / "jobs" / job_id / "out")
        assert set(actual) == set(expected) and all(torch.equal(actual[k], expected[k]) for k in expected)
        assert wait(client, other)["status"] == "succeeded"
    finally:
        stop(second)


@pytest.fixture(scope="module")
def streamed_direct(tmp_path_factory, four_layers, text_file) -> dict[str, torch.Tensor]:
    """The streamed recipe's checkpoint from an uninterrupted direct run, one thread."""
    folder = tmp_path_factory.mktemp("streamed-direct")
    spec = folder / "recipe.json"
    spec.write_text(json.dumps({**streamed(four_layers, text_file), "out": str(folder / "out")}))
    subprocess.run([sys.executable, "-m", "llmprune.cli", "--recipe", str(spec), "--threads", "1", "--device", "cpu",
                    "--quiet"], check=True, capture_output=True, timeout=300)
    return tensors(folder / "out")


def log_lines(workdir: Path, job_id: str) -> list[str]:
    """The job's log lines, read from the database (the server may be down)."""
    from llmprune.service.db import Database

    events = Database(workdir / "service.db").events(job_id)
    return [e["data"].get("message", "") for e in events if e["kind"] == "log"]


def freeze(server: Server, pid: int) -> None:
    """SIGSTOP a worker, as if it hung in its computation. A worker stopped inside one of its short
    database writes would keep SQLite's write lock and stall every other writer, which is not the
    hang these tests mean: then it runs on a moment and is stopped again."""
    import sqlite3

    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        db = sqlite3.connect(server.workdir / "service.db", timeout=1, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # the write lock: free unless someone holds it for over 1 s
            db.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            pass
        finally:
            db.close()
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"worker {pid} always held the database's write lock")


def test_sigterm_stops_each_job_its_own_way_and_the_next_start_finishes_them(
        tmp_path, roots, four_layers, llama_dir, text_file, streamed_direct):
    """SIGTERM to the server's process group (as Ctrl-C at a terminal) with three jobs running: the
    streamed one finishes its decoder layer in flight and stops between layers, an in-memory one
    stops at once, a hung one (SIGSTOP) is killed when --stop-grace runs out; each is queued again
    with one line from the server. Mid-run, the streamed job showed its dense perplexity and an
    ETA. The next start finishes all three, the streamed one from its journal with the checkpoint
    of an uninterrupted run."""
    workdir = tmp_path / "work"
    first = start(workdir, *roots, "--workers", "3", "--stop-grace", "5")
    client = first.client()
    layered, memory, hung = (client.submit(streamed(four_layers, text_file))["id"],
                             client.submit(recipe(llama_dir, text_file))["id"],
                             client.submit(recipe(llama_dir, text_file))["id"])
    # Each worker is frozen (SIGSTOP) where the test wants it when the server is told to stop:
    # the streamed one inside its prune stage, the others once they are under way.
    frozen: set[str] = set()
    deadline = time.monotonic() + 120
    while len(frozen) < 3 and time.monotonic() < deadline:
        for row in client.jobs():
            progress = row["progress"] or {}
            ready = progress.get("stage") == "prune" and progress["done"] >= 1 if row["id"] == layered else progress
            if row["id"] not in frozen and row["status"] == "running" and ready:
                freeze(first, worker_pid(first, row["id"]))
                frozen.add(row["id"])
        time.sleep(0.02)
    mid = client.job(layered)
    assert frozen == {layered, memory, hung} and mid["status"] == "running", mid
    assert mid["progress"]["stage"] == "prune" and mid["progress"]["done"] < 4, mid
    assert mid["result"]["ppl_dense"] > 1 and mid["progress"]["eta"] > mid["started"]
    status = cli(first, "status", layered).stdout
    assert f"dense ppl {mid['result']['ppl_dense']:.3f}" in status and "ETA" in status, status
    tick = time.monotonic()
    os.killpg(first.process.pid, signal.SIGTERM)
    for job_id in (layered, memory):  # these two go on and see the signal; the hung one never does
        os.kill(worker_pid(first, job_id), signal.SIGCONT)
    first.process.wait(timeout=60)
    assert time.monotonic() - tick < 30
    log = (tmp_path / "work-server.log").read_text()
    for job_id in (layered, memory, hung):
        assert log.count(f"job {job_id} was stopped while running; queued again") == 1, log
    stopped = [m for m in log_lines(workdir, layered) if m.startswith("stopped by")]
    assert len(stopped) == 1 and "decoder layers; queued again, to resume from its journal" in stopped[0], stopped
    layers_done = int(stopped[0].split(" after ")[1].split(" of ")[0])
    assert layers_done >= mid["progress"]["done"]
    assert "stopped by SIGTERM; queued again" in log_lines(workdir, memory)
    assert any(m.startswith("killed: still running 5 s") for m in log_lines(workdir, hung))
    second = start(workdir, *roots, "--workers", "3")
    try:
        client = second.client()
        for job_id in (layered, memory, hung):
            job = wait(client, job_id)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
        restarts = [d for kind, d in client.events(layered, follow=False)
                    if kind == "progress" and d["stage"] == "prune"]
        assert restarts[-(5 - layers_done)]["done"] == layers_done  # the resumed attempt began after that layer
        actual = tensors(workdir / "jobs" / layered / "out")
        assert set(actual) == set(streamed_direct)
        assert all(torch.equal(actual[k], streamed_direct[k]) for k in streamed_direct)
    finally:
        stop(second)


def test_a_cancelled_job_that_does_not_stop_is_killed_after_the_grace(server, llama_dir, text_file):
    client = server.client()  # this server runs with --cancel-grace 2
    slow = recipe(llama_dir, text_file, evaluation={"source": str(text_file), "seqlen": 64, "windows": 60})
    job_id = client.submit(slow)["id"]
    wait(client, job_id, ("running",), timeout=60)
    pid = worker_pid(server, job_id)
    freeze(server, pid)  # hung: it can no longer see its cancel flag
    tick = time.monotonic()
    client.cancel(job_id)
    job = wait(client, job_id, timeout=30)
    assert job["status"] == "cancelled" and "did not stop within 2 s and was killed" in job["error"]
    assert time.monotonic() - tick >= 2
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (server.workdir / "jobs" / job_id / "out").exists()
    assert wait(client, client.submit(recipe(llama_dir, text_file))["id"])["status"] == "succeeded"


def test_pace_measures_the_eta_from_the_stage_start():
    from llmprune.progress import Event
    from llmprune.service.worker import Pace

    pace = Pace()
    assert pace.eta(Event("prune", 0, 4, "layers"), 100.0) is None  # no pace yet
    assert pace.eta(Event("prune", 1, 4, "layers"), 110.0) == 140.0  # 10 s a layer, 3 to go
    assert pace.eta(Event("prune", 2, 4, "layers"), 130.0) == 160.0  # 15 s a layer, 2 to go
    assert pace.eta(Event("prune", 4, 4, "layers"), 150.0) is None  # done
    assert pace.eta(Event("eval pruned", 2, 8, "windows"), 200.0) is None  # a new stage starts over
    assert pace.eta(Event("eval pruned", 4, 8, "windows"), 204.0) == 212.0  # 2 s a window, 4 to go
    resumed = Pace()  # a resumed prune starts at layer 2: only its own layers count
    assert resumed.eta(Event("prune", 2, 4, "layers"), 0.0) is None
    assert resumed.eta(Event("prune", 3, 4, "layers"), 5.0) == 10.0


def test_an_older_database_gains_the_newer_columns(tmp_path):
    import sqlite3

    from llmprune.service.db import ADDED, SCHEMA, Database

    path = tmp_path / "service.db"
    with sqlite3.connect(path) as db:
        old = SCHEMA
        for name, kind in ADDED.items():
            old = old.replace(f", {name} {kind}", "")
        assert old != SCHEMA
        db.executescript(old)
        db.execute("INSERT INTO jobs (id, status, recipe, created, stage, done, total, unit) "
                   "VALUES ('a', 'running', '{}', 1.0, 'prune', 1, 2, 'layers')")
    database = Database(path)
    assert database.get("a")["progress"] == {"stage": "prune", "done": 1, "total": 2, "unit": "layers", "eta": None}
    database.update("a", eta=5.0)
    assert database.get("a")["progress"]["eta"] == 5.0


def cli(server: Server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmprune.cli", *args, "--server", server.url], text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, "LLMPRUNE_TOKEN": TOKEN})


def test_the_command_line_client_submits_follows_and_fetches(server, llama_dir, text_file, tmp_path):
    import yaml

    spec = tmp_path / "recipe.yaml"
    spec.write_text(yaml.safe_dump({**recipe(llama_dir, text_file), "out": "./wherever"}))
    submitted = cli(server, "submit", str(spec))
    assert submitted.returncode == 0, submitted.stderr
    assert "dropping out: './wherever'" in submitted.stderr
    job_id = submitted.stdout.strip()
    logs = cli(server, "logs", job_id, "--follow")
    assert logs.returncode == 0 and "prune: " in logs.stdout and logs.stdout.strip().endswith("job succeeded")
    status = cli(server, "status", job_id)
    assert status.stdout.startswith(f"{job_id}  succeeded") and "ppl " in status.stdout
    fetched = cli(server, "fetch", job_id, str(tmp_path / "got"))
    assert fetched.returncode == 0 and "every SHA-256 checked" in fetched.stdout
    assert (tmp_path / "got" / "config.json").is_file()
    again = cli(server, "fetch", job_id, str(tmp_path / "got"))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    missing = cli(server, "status", "nope")
    assert missing.returncode == 2 and "404" in missing.stderr and "Traceback" not in missing.stderr
    wrong = subprocess.run([sys.executable, "-m", "llmprune.cli", "status", job_id, "--server", server.url],
                           text=True, capture_output=True, timeout=60, env={**os.environ, "LLMPRUNE_TOKEN": "bad"})
    assert wrong.returncode == 2 and "401" in wrong.stderr


def test_the_token_is_stored_nowhere(server):
    leaked = [p for p in server.workdir.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    log = server.workdir.parent / f"{server.workdir.name}-server.log"
    assert leaked == [] and TOKEN not in log.read_text()


def test_serving_beyond_loopback_needs_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LLMPRUNE_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "llmprune.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                             "--workdir", str(tmp_path / "w")], text=True, capture_output=True, timeout=60, env=env)
    assert result.returncode == 2 and "without a token" in result.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize("flags,words", [
    (["--ray-placement-timeout", "5"], "with --executor ray"),
    (["--executor", "ray", "--ray-placement-timeout", "-1"], "seconds, 0 or more"),
    (["--auth-limit", "-2"], "a count, 0"),
])
def test_bad_serve_settings_are_one_line_and_make_nothing(tmp_path, flags, words):
    result = subprocess.run([sys.executable, "-m", "llmprune.cli", "serve", "--port", "0", "--workdir",
                             str(tmp_path / "w"), *flags], text=True, capture_output=True, timeout=60)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


def test_the_api_keeps_to_its_openapi_spec(server):
    """Property-based, for every operation of /openapi.json: requests generated from the spec,
    with the token; no 5xx, and every response's status code, content type and body are the
    ones the spec declares."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30, checks=checks)

        check()


@pytest.mark.slow
def test_smollm2_through_the_service(server, tmp_path):
    """The real model, built-in name and texts (nothing to confine), a small calibration."""
    from transformers import AutoModelForCausalLM

    client = server.client()
    job = client.submit({"model": "smollm2-135m", "prune": {"method": "wanda", "sparsity": 0.5},
                         "calibration": {"source": "wikipedia", "samples": 8, "seqlen": 128},
                         "evaluation": {"source": "wikipedia", "seqlen": 128, "windows": 4}})
    done = wait(client, job["id"], timeout=600)
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert 5 < result["ppl_dense"] < result["ppl_pruned"] < 10 * result["ppl_dense"]
    client.fetch(job["id"], tmp_path / "smol")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_delete_removes_a_finished_job_and_refuses_a_live_one(server, llama_dir, text_file):
    client = server.client()
    slow = recipe(llama_dir, text_file, evaluation={"source": str(text_file), "seqlen": 64, "windows": 60})
    live = client.submit(slow)["id"]
    wait(client, live, ("running",), timeout=60)
    with server.http() as http:
        assert http.delete(f"/v1/jobs/{live}").status_code == 409
        client.cancel(live)
        wait(client, live)
        assert http.delete(f"/v1/jobs/{live}").status_code == 204
        assert http.get(f"/v1/jobs/{live}").status_code == 404
        assert http.delete(f"/v1/jobs/{live}").status_code == 404
    assert not (server.workdir / "jobs" / live).exists()


def test_the_token_can_come_from_a_file(tmp_path, roots):
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LLMPRUNE_TOKEN"}
    process = subprocess.Popen([sys.executable, "-m", "llmprune.cli", "serve", "--port", str(port), "--workdir",
                                str(tmp_path / "w"), "--token-file", str(token_file)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/jobs").status_code == 401
        ok = httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer from-a-file"})
        assert ok.status_code == 200 and ok.json() == {"jobs": []}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_the_throttle_counts_wrong_tokens_per_client_over_a_sliding_minute():
    from llmprune.service.throttle import Throttle

    now = [0.0]
    throttle = Throttle(3, window_s=60, clients=2, clock=lambda: now[0])
    for when in (0, 10, 20):
        assert throttle.wait("a") == 0
        now[0] = when
        throttle.failed("a")
    assert throttle.wait("a") == 40 and throttle.wait("b") == 0  # the oldest (t=0) ages out at t=60
    now[0] = 59.5
    assert throttle.wait("a") == 1
    now[0] = 60
    assert throttle.wait("a") == 0  # two left in the window
    throttle.failed("a")
    assert throttle.wait("a") == 10  # now t=10 is the oldest
    throttle.failed("b")
    throttle.failed("c")  # a third client: the least recently failed ("a") is forgotten
    assert set(throttle.failures) == {"b", "c"} and throttle.wait("a") == 0
    off = Throttle(0, clock=lambda: now[0])
    for _ in range(100):
        off.failed("a")
    assert off.wait("a") == 0 and not off.failures


def test_a_client_guessing_tokens_is_refused_until_its_minute_is_over(tmp_path, roots):
    # The only trusted proxy is 192.0.2.1 (a documentation address): what this loopback client
    # claims in X-Forwarded-For is ignored, so it cannot pose as another client.
    live = start(tmp_path / "work", *roots, "--auth-limit", "3", "--forwarded-allow-ips", "192.0.2.1")
    try:
        spoof = {"X-Forwarded-For": "203.0.113.7"}
        with live.http("wrong") as http:
            assert [http.get("/v1/jobs", headers=spoof).status_code for _ in range(2)] == [401, 401]
        assert httpx.post(f"{live.url}/signin", data={"token": "wrong"}).status_code == 401  # the third
        with live.http() as http:  # the right token now: refused like any guess, and says for how long
            for headers in ({}, spoof):
                refused = http.get("/v1/jobs", headers=headers)
                assert refused.status_code == 429 and 0 < int(refused.headers["retry-after"]) <= 60
                assert "too many wrong tokens from 127.0.0.1: try again in" in refused.json()["detail"]
        page = httpx.post(f"{live.url}/signin", data={"token": TOKEN})
        assert page.status_code == 429 and "set-cookie" not in page.headers and "try again in" in page.text
        assert httpx.get(f"{live.url}/healthz").status_code == 200
    finally:
        stop(live)


def test_a_late_client_resumes_the_event_stream_after_the_last_event_it_saw(server, llama_dir, text_file):
    client = server.client()
    job = wait(client, client.submit(recipe(llama_dir, text_file))["id"])
    with server.http() as http:
        whole = http.get(f"/v1/jobs/{job['id']}/events").text
    ids = [int(line[4:]) for line in whole.splitlines() if line.startswith("id: ")]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) > 5
    rest = list(client.events(job["id"], after=ids[-3]))
    assert [kind for kind, _ in rest][-1] == "end" and len(rest) == 3  # the last two events, then the end
    so_far = list(client.events(job["id"], follow=False))
    assert len(so_far) == len(ids) + 1


def test_a_job_pushes_with_the_servers_own_hub_token_which_is_stored_nowhere(tmp_path, roots, llama_dir, text_file):
    from hubstub import HubStub

    hub_token = "hf_server_secret_for_tests"
    with HubStub() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub_token, "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf")}
        live = start(tmp_path / "work", *roots, env=env)
        try:
            client = live.client()
            with live.http() as http:  # a token in the body is no recipe key: refused, naming it
                refused = http.post("/v1/jobs", json={**recipe(llama_dir, text_file), "hub_token": "hf_x"})
                assert refused.status_code == 422 and "hub_token" in refused.text
            job = wait(client, client.submit({**recipe(llama_dir, text_file), "push_to_hub": "me/tiny-pruned",
                                              "private": True})["id"])
            assert job["status"] == "succeeded", job["error"]
            assert "me/tiny-pruned" in str(job["result"]["pushed_to"])
            listed = {f["name"]: f for f in client.artifacts(job["id"])}
            pushed = hub.repos["me/tiny-pruned"]
            assert pushed["private"] is True and set(listed) <= set(pushed["files"])
            for name, entry in listed.items():
                assert hashlib.sha256(pushed["files"][name]).hexdigest() == entry["sha256"], name
            auth = {h.get("authorization", h.get("Authorization")) for _, _, h in hub.requests}
            assert auth == {f"Bearer {hub_token}"}  # the server's credentials, on every request
        finally:
            stop(live)
    leaked = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and hub_token.encode() in p.read_bytes()]
    assert leaked == [] and hub_token not in (tmp_path / "work-server.log").read_text()


def test_the_ray_relay_keeps_each_call_until_the_server_has_stored_it():
    """A Ray job's database calls are numbered and stay in its actor until the server says it
    stored them: a drain answer that is lost, or a call the database refuses, comes again."""
    from llmprune.service.ray_jobs import Relay

    relay = Relay({"id": "j", "recipe": {}})
    assert relay.get("j") == {"id": "j", "recipe": {}} and not relay.cancel_requested("j")
    relay.add_event("j", "log", {"level": "INFO", "message": "hello"})
    relay.update("j", stage="prune", done=1, total=2)
    assert relay.finish("j", "succeeded", None, {"ppl": 3.0})
    calls = relay.pending(0)
    assert [(c[0], c[1]) for c in calls] == [(1, "add_event"), (2, "update"), (3, "finish")]
    assert calls[1][3] == {"stage": "prune", "done": 1, "total": 2}
    assert relay.pending(0) == calls  # nothing stored yet: all of them again
    assert [c[0] for c in relay.pending(1)] == [2, 3]  # the first is stored: it goes
    assert relay.pending(3) == []
    relay.requeue("j")
    assert [(c[0], c[1]) for c in relay.pending(3)] == [(4, "requeue")]
    relay.cancel = True
    assert relay.cancel_requested("j")
