"""Benchmark: the service against the CLI, and the status route under many pollers.

    .venv/bin/python scripts/bench_service.py                  # SmolLM2-135M, a small calibration
    .venv/bin/python scripts/bench_service.py --model DIR --pollers 200 --poll-seconds 30

1. The same recipe through ``llmprune --recipe`` and through ``llmprune serve`` (submit, then
   poll until it succeeds), one after the other: target service <= 1.05 x CLI + 3 s.
2. The same job again while ``--pollers`` clients poll ``GET /v1/jobs/{id}`` (each once every
   ``--interval`` seconds, 0 = as fast as answered) for ``--poll-seconds``: target job wall
   within 10% of the unpolled service run; prints the
   route's p50/p99 latency. Results also go to ``--json``.

    .venv/bin/python scripts/bench_service.py --executor ray   # local executor against Ray

3. ``--executor ray``: the same job through a server with the local executor and through one
   with ``--executor ray`` on a one-node Ray cluster started here on loopback (``ray start
   --head``; or ``--ray-address`` an existing one), one after the other, Ray's start-up not
   counted: target Ray <= 1.10 x local + 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def recipe(model: str) -> dict[str, Any]:
    return {"model": model, "prune": {"method": "sparsegpt", "sparsity": 0.5},
            "calibration": {"source": "wikipedia", "samples": 8, "seqlen": 256},
            "evaluation": {"source": "wikipedia", "seqlen": 256, "windows": 4}}


def run_cli(model: str, work: Path, threads: int) -> float:
    spec = work / "recipe.json"
    spec.write_text(json.dumps({**recipe(model), "out": str(work / "cli-out")}))
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmprune.cli", "--recipe", str(spec), "--threads", str(threads),
                    "--device", "cpu", "--quiet"], check=True, cwd=ROOT)
    return time.perf_counter() - tick


def wait_done(http: httpx.Client, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)


async def poll(port: int, job_id: str, clients: int, seconds: float, interval: float) -> list[float]:
    """``clients`` keep-alive connections, each asking for the job's status every ``interval``
    seconds. Written on bare asyncio streams: a full HTTP client costs about as much CPU per
    request as the server, and on one machine that would be charged to the service."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    request = (f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
               ).encode()

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                tick = time.perf_counter()
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - tick)
                if any(f'"status": "{s}"'.encode() in body for s in ("succeeded", "failed", "cancelled")):
                    return
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - tick)))
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies


def start_server(work: Path, port: int, threads: int, models: list[str], *extra: str) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-m", "llmprune.cli", "serve", "--port", str(port), "--workdir",
                               str(work), "--threads", str(threads), *[a for m in models for a in ("--models-dir", m)],
                               *extra], env={**os.environ, "LLMPRUNE_TOKEN": TOKEN}, cwd=ROOT, start_new_session=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            assert server.poll() is None, "the server did not start"
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def timed_job(port: int, model: str) -> float:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=60) as http:
        tick = time.perf_counter()
        job = http.post("/v1/jobs", json=recipe(model)).json()
        done = wait_done(http, job["id"])
        assert done["status"] == "succeeded", done
        return time.perf_counter() - tick


def compare_executors(args: argparse.Namespace, work: Path, model: str, models: list[str]) -> None:
    ray = str(Path(sys.executable).parent / "ray")
    address, started = args.ray_address, False
    if address is None:
        port = free_port()
        subprocess.run([ray, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", str(args.threads), "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, capture_output=True)
        address, started = f"127.0.0.1:{port}", True
    walls: dict[str, float] = {}
    try:
        for executor in ("local", "ray"):
            port = free_port()
            extra = ("--executor", "ray", "--ray-address", address) if executor == "ray" else ()
            server = start_server(work / executor, port, args.threads, models, *extra)
            try:
                walls[executor] = timed_job(port, model)
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
    finally:
        if started:
            subprocess.run([ray, "stop", "--force"], capture_output=True)
    target = 1.10 * walls["local"] + 10
    print(f"{'executor':<12}{'wall s':>10}")
    print(f"{'local':<12}{walls['local']:>10.1f}")
    print(f"{'ray':<12}{walls['ray']:>10.1f}   {walls['ray'] / walls['local']:.3f} x local; target <= {target:.1f} "
          "(1.10 x local + 10 s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"local_s": walls["local"], "ray_s": walls["ray"],
                                               "ray_over_local": walls["ray"] / walls["local"],
                                               "target_ray_s": target, "threads": args.threads}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between one client's polls (0: as fast as the server answers)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="ray: compare the local executor with --executor ray instead")
    parser.add_argument("--ray-address", default=None, help="with --executor ray: an existing cluster")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmprune-bench-service-"))
    port = free_port()
    models = [str(Path(args.model).resolve().parent)] if Path(args.model).exists() else []
    if args.executor == "ray":
        try:
            compare_executors(args, work, str(Path(args.model).resolve()) if models else args.model, models)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    server = subprocess.Popen([sys.executable, "-m", "llmprune.cli", "serve", "--port", str(port), "--workdir",
                               str(work / "service"), "--threads", str(args.threads),
                               *[a for m in models for a in ("--models-dir", m)]],
                              env={**os.environ, "LLMPRUNE_TOKEN": TOKEN}, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    model = str(Path(args.model).resolve()) if models else args.model
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        cli = run_cli(model, work, args.threads)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        tick = time.perf_counter()
        job = http.post("/v1/jobs", json=recipe(model)).json()
        done = wait_done(http, job["id"])
        service = time.perf_counter() - tick
        assert done["status"] == "succeeded", done
        tick = time.perf_counter()
        job = http.post("/v1/jobs", json=recipe(model)).json()
        latencies = asyncio.run(poll(port, job["id"], args.pollers, args.poll_seconds, args.interval))
        done = wait_done(http, job["id"])
        polled = time.perf_counter() - tick
        ms = sorted(1000 * x for x in latencies)
        p50, p99 = statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]
        results = {"cli_s": cli, "service_s": service, "service_polled_s": polled,
                   "service_over_cli": service / cli, "target_service_s": 1.05 * cli + 3,
                   "polled_over_unpolled": polled / service, "status_requests": len(ms),
                   "status_p50_ms": p50, "status_p99_ms": p99, "pollers": args.pollers,
                   "interval_s": args.interval, "threads": args.threads}
        print(f"{'run':<28}{'wall s':>10}")
        print(f"{'CLI':<28}{cli:>10.1f}")
        print(f"{'service':<28}{service:>10.1f}   target <= {1.05 * cli + 3:.1f} (1.05 x CLI + 3 s)")
        print(f"{'service, ' + str(args.pollers) + ' pollers':<28}{polled:>10.1f}   {polled / service:.3f} x unpolled "
              "(target <= 1.10)")
        print(f"status route: {len(ms)} requests from {args.pollers} clients, one every {args.interval} s each, "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
