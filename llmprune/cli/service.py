"""``llmprune serve`` and its client commands: submit, jobs, status, logs, cancel, fetch."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError

SERVER_HELP = "the service's URL (default: $LLMPRUNE_SERVER or http://127.0.0.1:8600); token from $LLMPRUNE_TOKEN"


def _client_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llmprune {prog}", description=description)
    p.add_argument("--server", default=None, help=SERVER_HELP)
    return p


def _client(args: argparse.Namespace) -> Any:
    from llmprune.service.client import Client

    return Client(args.server)


def _slots(spec: str, threads: int | None, on_ray: bool = False) -> list[Any]:
    from llmprune.service.scheduler import Slot

    cores = os.cpu_count() or 1
    if spec.isdigit():
        count, devices = int(spec), None
    else:
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        count = len(devices)
    if count < 1:
        raise LlmpruneError(f"--workers must be a count >= 1 or a list of devices, got {spec!r}")
    per = threads or max(1, cores // count)
    if devices is None and on_ray:  # the cluster's GPUs, not this machine's, decide (when it is joined)
        devices = ["auto"] * count
    elif devices is None:
        import torch

        devices = ["cuda" if torch.cuda.is_available() else "cpu"] * count
    return [Slot(device, per) for device in devices]


def _token(token_file: str | None) -> str | None:
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise LlmpruneError(f"--token-file {path}: {exc.strerror or exc}") from None
        if not token:
            raise LlmpruneError(f"--token-file {path} is empty")
        return token
    return os.environ.get("LLMPRUNE_TOKEN") or None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(argv: Sequence[str]) -> int:
    from llmprune.service.scheduler import CANCEL_GRACE_S, STOP_GRACE_S

    p = argparse.ArgumentParser(prog="llmprune serve", description="Run pruning jobs for a team over HTTP.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--workdir", required=True, help="where the job database and every job's output live")
    p.add_argument("--models-dir", action="append", default=[], help="a folder whose models jobs may read (repeat)")
    p.add_argument("--data-dir", action="append", default=[], help="a folder whose texts and tasks jobs may read")
    p.add_argument("--workers", default="1", help="jobs at once: a count, or devices such as cuda:0,cuda:1")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: each job on an existing Ray cluster")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster (host:port of its head, or 'auto'); with --executor ray")
    p.add_argument("--ray-placement-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --executor ray: a job the cluster has not placed by then (no node with its CPUs "
                        "and GPU, or none free) fails, saying what it asked for (default 600; 0: wait as long "
                        "as it takes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: cores / workers)")
    p.add_argument("--token-file", default=None, help="a file holding the API token (default: $LLMPRUNE_TOKEN)")
    p.add_argument("--max-queued", type=int, default=100, help="waiting jobs beyond which submissions get 429")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 above)")
    p.add_argument("--cancel-grace", type=float, default=CANCEL_GRACE_S, metavar="SECONDS",
                   help="a cancelled job still running after this is killed (default %(default)g)")
    p.add_argument("--stop-grace", type=float, default=STOP_GRACE_S, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long running jobs get to finish their decoder layer in flight "
                        "before they are killed; either way they are queued again (default %(default)g)")
    p.add_argument("--auth-limit", type=int, default=None, metavar="N",
                   help="wrong tokens a client may send in a minute; beyond, it is refused (429) until the minute "
                        "is over (default 20; 0: no limit)")
    p.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                   help="behind a reverse proxy: the proxy addresses (comma-separated, or '*') whose "
                        "X-Forwarded-For/-Proto name the client and the scheme, so a TLS proxy's https origin, "
                        "Secure cookies and the per-client limit work (default: $FORWARDED_ALLOW_IPS, else 127.0.0.1)")
    args = p.parse_args(argv)
    if args.auth_limit is not None and args.auth_limit < 0:
        raise LlmpruneError("--auth-limit is a count, 0 (no limit) or more")
    if args.cancel_grace < 0 or args.stop_grace < 0:
        raise LlmpruneError("--cancel-grace and --stop-grace are seconds, 0 or more")
    if args.ray_placement_timeout is not None and (args.executor != "ray" or not args.ray_placement_timeout >= 0):
        raise LlmpruneError("--ray-placement-timeout is seconds, 0 or more, with --executor ray")
    token = _token(args.token_file)
    if token is None and not _loopback(args.host):
        raise LlmpruneError(f"refusing to serve on {args.host} without a token: set LLMPRUNE_TOKEN or --token-file")
    for folder in [*args.models_dir, *args.data_dir]:
        if not Path(folder).expanduser().is_dir():
            raise LlmpruneError(f"{folder} is not a folder")
    import uvicorn

    from llmprune.service.app import AUTH_LIMIT, Settings, create_app
    from llmprune.service.ray_jobs import PLACEMENT_TIMEOUT_S

    settings = Settings(workdir=Path(args.workdir).expanduser(), token=token,
                        models=[Path(m).expanduser().resolve() for m in args.models_dir],
                        data=[Path(d).expanduser().resolve() for d in args.data_dir],
                        slots=_slots(args.workers, args.threads, args.executor == "ray"), max_body=args.max_body,
                        max_queued=args.max_queued, cancel_grace=args.cancel_grace,
                        stop_grace=args.stop_grace, executor=args.executor, ray_address=args.ray_address,
                        ray_placement_timeout=(PLACEMENT_TIMEOUT_S if args.ray_placement_timeout is None
                                               else args.ray_placement_timeout),
                        auth_limit=AUTH_LIMIT if args.auth_limit is None else args.auth_limit)
    if args.ray_address is not None and args.executor != "ray":
        raise LlmpruneError("--ray-address goes with --executor ray")
    app = create_app(settings)
    workers = ", ".join(f"{s.device} x{s.threads} threads" for s in settings.slots)
    if args.executor == "ray":
        workers = f"{len(settings.slots)} at once on the Ray cluster at {args.ray_address or 'auto'}"
    print(f"llmprune serve: http://{args.host}:{args.port} (workdir {settings.workdir}; workers: {workers}; "
          f"token {'required' if token else 'not set: loopback only'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=True,
                forwarded_allow_ips=args.forwarded_allow_ips)
    return 0


def cmd_submit(argv: Sequence[str]) -> int:
    p = _client_parser("submit", "Submit a recipe to the service; prints the job id.")
    p.add_argument("recipe", help="a YAML recipe (its out is dropped: the server decides where outputs go)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = p.parse_args(argv)
    from llmprune.jobs.recipe import apply_set, read_recipe

    recipe = read_recipe(args.recipe)
    for assignment in args.set:
        apply_set(recipe, assignment)
    for key in ("out", "overwrite", "resume", "offload_dir"):
        if key in recipe:
            print(f"llmprune submit: dropping {key}: {recipe.pop(key)!r} (the server decides)", file=sys.stderr)
    job = _client(args).submit(recipe)
    print(job["id"])
    return 0


def _describe(job: dict[str, Any]) -> str:
    line = f"{job['id']}  {job['status']}"
    progress = job.get("progress")
    if progress and job["status"] == "running":
        line += f"  {progress['stage']} {progress['done']}/{progress['total']} {progress['unit']}"
        if progress.get("eta") is not None:
            line += f"  ETA {max(0.0, progress['eta'] - time.time()):.0f} s (this stage)"
    result = job.get("result") or {}
    if result.get("ppl_pruned") is not None and result.get("ppl_dense") is not None:
        line += f"  ppl {result['ppl_dense']:.3f} -> {result['ppl_pruned']:.3f}"
    elif result.get("ppl_dense") is not None:
        line += f"  dense ppl {result['ppl_dense']:.3f}"
    if result.get("sparsity_achieved") is not None:
        line += f"  sparsity {result['sparsity_achieved']:.4f}"
    if job.get("error"):
        line += f"  error: {job['error']}"
    return line


def cmd_status(argv: Sequence[str]) -> int:
    p = _client_parser("status", "A job's status, stage, progress and numbers.")
    p.add_argument("job")
    args = p.parse_args(argv)
    print(_describe(_client(args).job(args.job)))
    return 0


def cmd_jobs(argv: Sequence[str]) -> int:
    p = _client_parser("jobs", "The service's jobs, newest first.")
    p.add_argument("--status", default=None)
    args = p.parse_args(argv)
    for job in _client(args).jobs(args.status):
        print(_describe(job))
    return 0


def cmd_logs(argv: Sequence[str]) -> int:
    p = _client_parser("logs", "A job's events (progress and log lines) from the start.")
    p.add_argument("job")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job finishes")
    args = p.parse_args(argv)
    for kind, data in _client(args).events(args.job, follow=args.follow):
        _print_event(kind, data)
    return 0


def _print_event(kind: str, data: dict[str, Any]) -> None:
    if kind == "progress":
        print(f"{data['stage']}: {data['done']}/{data['total']} {data['unit']}", flush=True)
    elif kind == "log":
        print(f"{data['level'].lower()}: {data['message']}", flush=True)
    elif kind == "end":
        print(f"job {data['status']}", flush=True)


def cmd_cancel(argv: Sequence[str]) -> int:
    p = _client_parser("cancel", "Cancel a queued or running job.")
    p.add_argument("job")
    args = p.parse_args(argv)
    job = _client(args).cancel(args.job)
    stopping = job["cancel_requested"] and job["status"] == "running"
    print(f"{job['id']}  {job['status']}{'  (stopping)' if stopping else ''}")
    return 0


def cmd_fetch(argv: Sequence[str]) -> int:
    p = _client_parser("fetch", "Download a finished job's checkpoint folder, verified file by file.")
    p.add_argument("job")
    p.add_argument("dest", help="a new folder")
    args = p.parse_args(argv)
    files = _client(args).fetch(args.job, Path(args.dest))
    total = sum(f["bytes"] for f in files)
    print(f"fetched {len(files)} files ({total / 1e6:.1f} MB) to {args.dest}, every SHA-256 checked")
    return 0


COMMANDS = {"serve": cmd_serve, "submit": cmd_submit, "jobs": cmd_jobs, "status": cmd_status, "logs": cmd_logs,
            "cancel": cmd_cancel, "fetch": cmd_fetch}
