"""Benchmark: pruning time, peak memory and perplexity on SmolLM2-135M.

Each configuration runs in its own process (so peak RSS is its own). Pruning time excludes model
loading and evaluation; peak RSS is the resident-set high-water mark of the pruning step alone
(reset through /proc/self/clear_refs just before it), with the process's overall peak also shown.

    .venv/bin/python scripts/bench_prune.py                      # pydoc calibration, 1 thread
    .venv/bin/python scripts/bench_prune.py --calib wikipedia --threads 2 --json out/bench.json

Setup as in the quality targets of the engine issue: 32 x 512 calibration tokens, perplexity on
the first 20 non-overlapping 512-token windows of the offline Wikipedia evaluation split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    ("dense", "unstructured", 0.0),
    ("magnitude", "unstructured", 0.5),
    ("wanda", "unstructured", 0.5),
    ("sparsegpt", "unstructured", 0.5),
    ("sparsegpt", "4:8", None),
    ("sparsegpt", "2:4", None),
    ("wanda", "2:4", None),
    ("wanda", "unstructured", 0.6),
]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def run_one(args: argparse.Namespace) -> dict[str, object]:
    import torch

    torch.set_num_threads(args.threads)
    import llmprune
    from llmprune.eval.perplexity import perplexity
    from llmprune.io.data import evaluation_data

    model, tokenizer = llmprune.load_model("smollm2-135m")
    calibration = llmprune.calibration_data(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    result: dict[str, object] = {"method": args.method, "pattern": args.pattern, "sparsity": args.sparsity,
                                 "sequential": args.sequential, "threads": torch.get_num_threads()}
    if args.method != "dense":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure the pruning alone
        except OSError:
            pass
        config = llmprune.PruneConfig(method=args.method, pattern=args.pattern, sparsity=args.sparsity,
                                      sequential=args.sequential)
        tick = time.perf_counter()
        report = llmprune.prune(model, config, calibration)
        result["prune_s"] = time.perf_counter() - tick
        result["prune_peak_rss_gb"] = _status_kb("VmHWM") / 1e6
        result["sparsity_achieved"] = report.sparsity
    # Evaluation text is read only now, so the pruning step's peak does not include it; batch 1,
    # as the reference code evaluates.
    windows = evaluation_data(tokenizer, "wikipedia", 512, 20)
    result["ppl"] = perplexity(model, windows, batch_size=1)
    import resource

    result["process_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", default="pydoc")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", default=None, help="comma list of method:pattern[:sparsity] to run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "PATTERN", "SPARSITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        args.method, args.pattern = args.one[0], args.one[1]
        args.sparsity = None if args.one[2] == "None" else float(args.one[2])
        print("RESULT " + json.dumps(run_one(args)))
        return

    configs = CONFIGS
    if args.only:
        configs = [c for c in CONFIGS if f"{c[0]}:{c[1]}:{c[2]}".startswith(tuple(args.only.split(",")))]
    mode = "true-sequential" if args.sequential else "not sequential (as the reference code)"
    print(f"SmolLM2-135M, calibration {args.calib} {args.nsamples} x {args.seqlen} (seed {args.seed}), "
          f"{args.threads} thread(s), {mode}; ppl: wikipedia eval, 20 x 512")
    header = (f"{'method':<10} {'pattern':<12} {'sparsity':>8} {'prune s':>8} {'prune RSS GB':>12} "
              f"{'proc RSS GB':>11} {'ppl':>9}")
    print(header)
    rows = []
    for method, pattern, sparsity in configs:
        cmd = [sys.executable, __file__, "--one", method, pattern, str(sparsity), "--calib", args.calib,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
               "--threads", str(args.threads), "--sequential" if args.sequential else "--no-sequential"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{method:<10} {pattern:<12} failed:\n{done.stderr[-2000:]}")
            continue
        r = json.loads(line[7:])
        rows.append(r)
        n_m = [int(v) for v in pattern.split(":")] if ":" in pattern else None
        shown = f"{1 - n_m[0] / n_m[1]:.2f}" if n_m else f"{sparsity:.2f}"
        prune_s = f"{r['prune_s']:.1f}" if "prune_s" in r else "-"
        rss = f"{r['prune_peak_rss_gb']:.2f}" if "prune_peak_rss_gb" in r else "-"
        print(f"{method:<10} {pattern:<12} {shown:>8} {prune_s:>8} {rss:>12} "
              f"{r['process_peak_rss_gb']:>11.2f} {r['ppl']:>9.2f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
