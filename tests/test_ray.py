"""Scale-out on Ray, for real: a local Ray head node on loopback started by the tests, and
``llmprune serve --executor ray`` sending each job to it. The server's SQLite store stays the
only record; the cluster keeps nothing it needs after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service import free_port, recipe, start, stop, tensors, wait

pytestmark = pytest.mark.slow  # a Ray head node and a server: CI runs them, the quick loop may skip them

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs), and this test process connected to it (to
    look at and kill the job actors as a failing node would)."""
    import ray

    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True, env=env,
                   timeout=120)
    address = f"127.0.0.1:{port}"
    ray.init(address=address, namespace="llmprune", log_to_driver=False)
    try:
        yield address
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.fixture
def ray_server(tmp_path, cluster, llama_dir, text_file):
    server = start(tmp_path / "work", llama_dir.parent, text_file.parent, "--executor", "ray", "--ray-address",
                   cluster, "--cancel-grace", "5")
    yield server
    stop(server)


def slow_recipe(llama_dir: Path, text_file: Path) -> dict:
    return recipe(llama_dir, text_file, evaluation={"source": str(text_file), "seqlen": 64, "windows": 60})


def actor(workdir: Path, job_id: str, timeout: float = 30, attempt: int = 1):
    """The job's actor on the cluster (the job is marked running just before it is placed)."""
    import ray

    from llmprune.service.ray_jobs import actor_name, actor_prefix

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get_actor(actor_name(actor_prefix(workdir), job_id, attempt), namespace="llmprune")
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def actor_gone(workdir: Path, job_id: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            actor(workdir, job_id, timeout=0)
        except ValueError:
            return True
        time.sleep(0.2)
    return False


def test_a_job_on_ray_succeeds_with_what_a_local_run_writes(ray_server, llama_dir, text_file, tmp_path):
    client = ray_server.client()
    job = client.submit(recipe(llama_dir, text_file))
    done = wait(client, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    names = {f["name"] for f in client.artifacts(job["id"])}
    assert {"llmprune.json", "README.md", "config.json"} <= names
    logs = [data["message"] for kind, data in client.events(job["id"], follow=False) if kind == "log"]
    assert any("sent to the Ray cluster" in line for line in logs)
    assert actor_gone(ray_server.workdir, job["id"])  # a finished job leaves nothing on the cluster
    from test_service import direct_run

    local = direct_run(llama_dir, text_file, tmp_path / "direct")
    on_ray = tensors(ray_server.workdir / "jobs" / job["id"] / "out")
    assert set(local) == set(on_ray) and all((local[k] == on_ray[k]).all() for k in local)


def test_cancel_stops_a_running_ray_job(ray_server, llama_dir, text_file):
    client = ray_server.client()
    job = client.submit(slow_recipe(llama_dir, text_file))
    wait(client, job["id"], ("running",), timeout=60)
    actor(ray_server.workdir, job["id"])  # it is on the cluster
    client.cancel(job["id"])
    done = wait(client, job["id"], timeout=60)
    assert done["status"] == "cancelled"
    assert actor_gone(ray_server.workdir, job["id"])


def test_a_killed_ray_worker_fails_its_job_with_the_reason(ray_server, llama_dir, text_file):
    import ray

    client = ray_server.client()
    job = client.submit(slow_recipe(llama_dir, text_file))
    wait(client, job["id"], ("running",), timeout=60)
    pid = ray.get(actor(ray_server.workdir, job["id"]).pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)  # as the OOM killer or a lost node would
    done = wait(client, job["id"], timeout=60)
    assert done["status"] == "failed" and "Ray actor died" in done["error"], done
    # The service goes on: the next job runs.
    again = client.submit(recipe(llama_dir, text_file))
    assert wait(client, again["id"])["status"] == "succeeded"


def test_a_streamed_job_whose_actor_dies_resumes_once_from_its_journal(ray_server, llama_dir, text_file,
                                                                      tmp_path):
    import ray

    client = ray_server.client()
    # Its evaluation (600 windows) outlasts the time the server takes to see the stage begin.
    streamed = {**recipe(llama_dir, text_file, evaluation={"source": str(text_file), "seqlen": 64, "windows": 600}),
                "stream": "on"}
    job = client.submit(streamed)
    deadline = time.monotonic() + 120
    seen = []
    while True:  # killed after its layers are journaled on the shared workdir, while it evaluates
        progress = client.job(job["id"])["progress"] or {}
        seen.append((progress.get("stage"), progress.get("done")))
        if progress.get("stage") == "eval pruned":
            break
        assert time.monotonic() < deadline and progress.get("stage") != "save", sorted(set(seen), key=seen.index)
        time.sleep(0.05)
    os.kill(ray.get(actor(ray_server.workdir, job["id"]).pid.remote(), timeout=30), signal.SIGKILL)
    done = wait(client, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    logs = [data["message"] for kind, data in client.events(job["id"], follow=False) if kind == "log"]
    assert any("Ray actor died" in line for line in logs) and any("resuming from" in line for line in logs)
    from test_service import direct_run

    local = direct_run(llama_dir, text_file, tmp_path / "direct")
    resumed = tensors(ray_server.workdir / "jobs" / job["id"] / "out")
    assert set(local) == set(resumed) and all((local[k] == resumed[k]).all() for k in local)


def test_the_final_status_arrives_after_a_server_restart(cluster, llama_dir, text_file, tmp_path):
    workdir = tmp_path / "work"
    args = ("--executor", "ray", "--ray-address", cluster)
    first = start(workdir, llama_dir.parent, text_file.parent, *args)
    try:
        client = first.client()
        job = client.submit(slow_recipe(llama_dir, text_file))
        wait(client, job["id"], ("running",), timeout=60)
        deadline = time.monotonic() + 60
        while client.job(job["id"])["progress"] is None:  # under way on the cluster
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        stop(first)
    actor(workdir, job["id"])  # the server is gone; the job is not
    second = start(workdir, llama_dir.parent, text_file.parent, *args, port=int(first.url.rsplit(":", 1)[1]))
    try:
        client = second.client()
        done = wait(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 1  # followed to the end, not run again
        assert {f["name"] for f in client.artifacts(job["id"])} >= {"llmprune.json"}
        assert actor_gone(workdir, job["id"])
    finally:
        stop(second)


def test_a_job_the_cluster_cannot_place_fails_saying_what_it_asked_for(tmp_path, cluster, llama_dir, text_file):
    """4 CPUs a job on a one-node cluster of 2: warned at once, failed at the placement timeout,
    its pending actor gone; the server goes on."""
    server = start(tmp_path / "work", llama_dir.parent, text_file.parent, "--executor", "ray", "--ray-address",
                   cluster, "--threads", "4", "--ray-placement-timeout", "3")
    try:
        client = server.client()
        job = client.submit(recipe(llama_dir, text_file))
        done = wait(client, job["id"], timeout=60)
        assert done["status"] == "failed", done
        assert "did not place it within 3 s" in done["error"] and "4 CPUs" in done["error"], done["error"]
        assert "the largest: 2 CPUs, 0 GPUs" in done["error"], done["error"]
        logs = [data for kind, data in client.events(job["id"], follow=False) if kind == "log"]
        assert any(d["level"] == "WARNING" and "no node of the Ray cluster has 4 CPUs" in d["message"] for d in logs)
        assert actor_gone(server.workdir, job["id"])
    finally:
        stop(server)


def test_a_starting_server_stops_its_own_leftover_actors_and_no_one_elses(tmp_path, cluster, llama_dir, text_file):
    import ray

    from llmprune.service.ray_jobs import actor_name, actor_prefix

    class Idle:  # defined here, so Ray ships it by value to its worker
        def ping(self) -> int:
            return 1

    workdir, other = tmp_path / "work", tmp_path / "other-service"
    args = ("--executor", "ray", "--ray-address", cluster)
    first = start(workdir, llama_dir.parent, text_file.parent, *args)
    try:
        client = first.client()
        job = client.submit(recipe(llama_dir, text_file))
        assert wait(client, job["id"])["status"] == "succeeded"
    finally:
        stop(first)
    # As a server stopped between the job's end and its actor's kill would leave it; and one of
    # another service's jobs, with the same job id, on the same cluster.
    mine, theirs = (actor_name(actor_prefix(w), job["id"], 1) for w in (workdir, other))
    idle = ray.remote(Idle)
    leftovers = [idle.options(name=name, num_cpus=0, lifetime="detached", namespace="llmprune").remote()
                 for name in (mine, theirs)]
    assert ray.get([a.ping.remote() for a in leftovers], timeout=60) == [1, 1]
    second = start(workdir, llama_dir.parent, text_file.parent, *args, port=int(first.url.rsplit(":", 1)[1]))
    try:
        assert actor_gone(workdir, job["id"])
        assert ray.get(ray.get_actor(theirs, namespace="llmprune").ping.remote(), timeout=30) == 1
        log = (tmp_path / "work-server.log").read_text()
        assert f"stopped {mine}, a Ray actor no running job owns" in log and theirs not in log
    finally:
        stop(second)
        ray.kill(leftovers[1], no_restart=True)


def test_an_unreachable_cluster_is_one_line_before_the_server_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmprune.cli", "serve", "--port", str(free_port()), "--workdir",
                             str(tmp_path / "w"), "--executor", "ray", "--ray-address", f"127.0.0.1:{free_port()}"],
                            text=True, capture_output=True, timeout=180)
    assert result.returncode != 0 and "Ray cluster" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()
