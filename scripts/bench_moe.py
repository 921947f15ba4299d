"""Mixture-of-experts quality and size on a real-weights MoE built from SmolLM2-135M.

The test bed (:mod:`llmprune.io.moe_testbed`): each layer's 1536 MLP channels split into a
shared expert (the 768 that contribute most) and E routed experts (balanced k-means on the
others' co-activation), saved as a stock Qwen2-MoE; the router fitted by least squares (on
Wikipedia calibration text, seed 1) to predict each expert's output norm, top_k of E per token.
Then, on the same calibration budget (Wikipedia calibration split, seed 0) and the held-out
Wikipedia evaluation split:

* SparseGPT 50% and 2:4 with per-expert statistics from the routed tokens, against the same
  with every expert's statistics from all tokens (calibrate-all-experts), router-weighted, and
  against magnitude;
* expert removal at 25% by REAP, REAP summed over the routed tokens, routing frequency and
  random: perplexity, parameters, safetensors bytes and decode tokens/s before and after.

    .venv/bin/python scripts/bench_moe.py --threads 2 --json out/bench-moe.json

Prints one table and writes the JSON; every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import llmprune
from llmprune.eval.perplexity import perplexity
from llmprune.eval.speed import decode_speed
from llmprune.io.data import evaluation_data
from llmprune.io.moe_testbed import build_moe
from llmprune.structured.experts import remove_experts
from llmprune.structured.run import StructuredConfig

SPARSE = [  # name, method, pattern, sparsity, expert statistics
    ("magnitude 50%", "magnitude", "unstructured", 0.5, "routed"),
    ("sparsegpt 50% routed", "sparsegpt", "unstructured", 0.5, "routed"),
    ("sparsegpt 50% all tokens", "sparsegpt", "unstructured", 0.5, "all"),
    ("sparsegpt 50% router-weighted", "sparsegpt", "unstructured", 0.5, "weighted"),
    ("magnitude 2:4", "magnitude", "2:4", None, "routed"),
    ("sparsegpt 2:4 routed", "sparsegpt", "2:4", None, "routed"),
    ("sparsegpt 2:4 all tokens", "sparsegpt", "2:4", None, "all"),
]
SCORES = ("reap", "reap-sum", "frequency", "random")


def folder_bytes(model: Any) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of --seqlen tokens")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20, help="evaluation windows of --seqlen tokens")
    parser.add_argument("--remove", type=float, default=0.25, help="fraction of experts removed per layer")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated row names (or 'removal') to run")
    parser.add_argument("--json", default="bench-moe.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.only.split(",")) if args.only else None
    dense, tokenizer = llmprune.load_model("smollm2-135m")
    windows = evaluation_data(tokenizer, "wikipedia", args.seqlen, args.windows)
    router_text = llmprune.calibration_data(tokenizer, "wikipedia", nsamples=args.nsamples, seqlen=args.seqlen, seed=1)
    calibration = llmprune.calibration_data(tokenizer, "wikipedia", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    rows: list[dict[str, Any]] = []

    def row(name: str, model: Any, seconds: float, **extra: Any) -> None:
        ppl = perplexity(model, windows, batch_size=4)
        rows.append({"name": name, "ppl": ppl, "seconds": seconds, **extra})
        print(f"{name:34s} ppl {ppl:9.2f}  {seconds:7.1f} s  {extra if extra else ''}", flush=True)

    tick = time.perf_counter()
    exact = build_moe(dense, args.experts, args.experts)
    probe = windows[:1, :128]
    with torch.no_grad():
        gap = (exact(probe).logits - dense(probe).logits).abs().max().item()
    print(f"top_k = E with a zero router: max |logit difference| to the dense model {gap:.2e}")
    del exact
    moe = build_moe(dense, args.experts, args.top_k, router_text)
    build_s = time.perf_counter() - tick
    row("dense SmolLM2-135M", dense, 0.0)
    c = moe.config
    shape = f"{c.shared_expert_intermediate_size}+{c.num_experts}x{c.moe_intermediate_size}"
    row(f"MoE {shape} top-{c.num_experts_per_tok}", moe, build_s)
    for name, method, pattern, sparsity, statistics in SPARSE:
        if wanted and name not in wanted:
            continue
        pruned = copy.deepcopy(moe)
        tick = time.perf_counter()
        report = llmprune.prune(pruned, llmprune.PruneConfig(method=method, pattern=pattern, sparsity=sparsity,
                                                             expert_statistics=statistics), calibration)
        experts = report.experts() or {"containers": {}}
        starving = sum(len(c["magnitude_fallback"]) for c in experts["containers"].values())
        row(name, pruned, time.perf_counter() - tick, sparsity=round(report.sparsity, 4), starving_experts=starving)
    if not wanted or "removal" in wanted:
        before = {"params": sum(p.numel() for p in moe.parameters()), "bytes": folder_bytes(moe),
                  "tokens_per_s": decode_speed(moe, tokenizer, args.decode_tokens)["tokens_per_s"]}
        print(f"before removal: {before}")
        for score in SCORES:
            small = copy.deepcopy(moe)
            tick = time.perf_counter()
            small, report = remove_experts(small, StructuredConfig("experts", sparsity=args.remove, score=score),
                                           calibration)
            seconds = time.perf_counter() - tick
            after = {"params": report.params_after, "bytes": folder_bytes(small),
                     "tokens_per_s": decode_speed(small, tokenizer, args.decode_tokens)["tokens_per_s"]}
            row(f"remove {args.remove:.0%} experts by {score}", small, seconds, experts=report.experts_after,
                params_ratio=round(after["params"] / before["params"], 4),
                bytes_ratio=round(after["bytes"] / before["bytes"], 4),
                decode_speedup=round(after["tokens_per_s"] / before["tokens_per_s"], 3), before=before, after=after)
    print()
    print(f"{'run':34s} {'perplexity':>10s} {'seconds':>8s}")
    for item in rows:
        print(f"{item['name']:34s} {item['ppl']:10.2f} {item['seconds']:8.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "logit_gap_top_k_all": gap, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
