"""Benchmark of structured pruning on SmolLM2-135M: perplexity, size and decode speed per score
and ratio, plus a plot of perplexity against parameters removed.

    .venv/bin/python scripts/bench_structured.py                       # 2 threads, out/bench_structured.*
    .venv/bin/python scripts/bench_structured.py --ratios 0.1,0.2 --scores obs,flap --threads 1

Setup as in the structured-pruning issue: 32 x 512 calibration tokens from the offline Wikipedia
calibration split, perplexity on the first 20 non-overlapping 512-token windows of the evaluation
split. Quality phase: ``--pattern structured --params R`` for every score and ratio; the split
between heads and channels is allocated once per ratio by the OBS solver (on the dense model) and
shared by all scores, so the scores are compared on the same structure. Speed phase (run alone,
nothing else on the machine): decode speed of the dense model and of each pattern at
``--speed-ratio`` of decoder-layer parameters, batch 1, greedy, same prompt, same process and
threads, alternating for ``--speed-rounds`` rounds (median of the per-round ratios, with their
range); size is the safetensors written by save_pretrained. The last column, dense weight bytes
over pruned weight bytes, is what a memory-bound decode step of a width-pruned model can gain at
most. ``structured+K`` adds ``--drop-layers K`` (K whole layers first, heads/channels for the rest
of the ratio); a second plot, ``<out>-speed.png``, puts perplexity against speed-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", default="obs,magnitude,wanda-sp,flap,taylor")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--speed-ratio", type=float, default=0.25)
    parser.add_argument("--speed-patterns", default="structured,structured+4,structured+7,layers",
                        help="patterns measured for decode speed at --speed-ratio (empty: skip); "
                        "structured+K also drops K whole layers (--drop-layers K)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--speed-rounds", type=int, default=5,
                        help="dense/pruned decode measurements, alternating; the median ratio is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default="out/bench_structured", help="prefix of the .json and .png written")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import llmprune
    from llmprune.engine.gradients import loss_gradients
    from llmprune.engine.model import find_decoder_layers
    from llmprune.eval.perplexity import perplexity
    from llmprune.eval.speed import decode_speed, weights_bytes
    from llmprune.io.data import evaluation_data
    from llmprune.structured.run import StructuredConfig, plan_split, prune_structured

    model, tokenizer = llmprune.load_model("smollm2-135m")
    calibration = llmprune.calibration_data(tokenizer, "wikipedia", args.nsamples, args.seqlen, 0)
    windows = evaluation_data(tokenizer, "wikipedia", 512, 20)
    layer_params = sum(p.numel() for p in find_decoder_layers(model)[1].parameters())
    print(f"SmolLM2-135M, calibration wikipedia {args.nsamples} x {args.seqlen}, {torch.get_num_threads()} threads; "
          "ppl: wikipedia eval, 20 x 512", flush=True)
    dense_ppl = perplexity(model, windows)
    rows: list[dict[str, Any]] = [{"score": "dense", "ratio": 0.0, "ppl": dense_ppl, "removed": 0.0,
                                   "weights_mb": weights_bytes(model) / 1e6}]
    print(f"{'score':<10} {'target':>7} {'removed':>8} {'heads':>6} {'channels':>9} {'ppl':>9} {'weights MB':>11} "
          f"{'prune s':>8}", flush=True)
    print(f"{'dense':<10} {0:>7.0%} {0:>8.1%} {'':>6} {'':>9} {dense_ppl:>9.2f} {rows[0]['weights_mb']:>11.1f}",
          flush=True)

    scores = [s for s in args.scores.split(",") if s]
    grads = None
    if "taylor" in scores or "obd" in scores:
        tick = time.perf_counter()
        grads = loss_gradients(model, calibration, torch.device("cpu"))
        print(f"(gradients: {time.perf_counter() - tick:.0f} s, shared by every ratio)", flush=True)
    for ratio in (float(r) for r in args.ratios.split(",") if r):
        split = plan_split(model, StructuredConfig("structured", params=ratio), calibration)
        for score in scores:
            work = copy.deepcopy(model)
            config = StructuredConfig("structured", params=ratio, score=score, split=split)
            tick = time.perf_counter()
            pruned, report = prune_structured(work, config, calibration, gradients=grads)
            seconds = time.perf_counter() - tick
            del work
            ppl = perplexity(pruned, windows)
            row = {"score": score, "ratio": ratio, "split": list(split), "ppl": ppl,
                   "removed": report.layer_params_removed, "weights_mb": weights_bytes(pruned) / 1e6,
                   "prune_s": seconds, "heads": report.heads_after, "intermediate": report.intermediate_after}
            rows.append(row)
            print(f"{score:<10} {ratio:>7.0%} {row['removed']:>8.1%} {report.heads_after:>6} "
                  f"{report.intermediate_after:>9} {ppl:>9.2f} {row['weights_mb']:>11.1f} {seconds:>8.1f}", flush=True)

    speed_rows = []
    patterns = [p for p in args.speed_patterns.split(",") if p]
    if patterns:
        print(f"\nDecode speed at {args.speed_ratio:.0%} of decoder-layer parameters (batch 1, greedy, "
              f"{args.decode_tokens} tokens, {torch.get_num_threads()} threads)", flush=True)
        print(f"{'pattern':<14} {'layers':>6} {'heads':>5} {'mlp':>5} {'removed':>8} {'ppl':>9} {'disk MB':>8} "
              f"{'tok/s':>7} {'dense tok/s':>12} {'speedup':>8} {'rounds':>9} {'bytes ratio':>11}", flush=True)
        for pattern in patterns:
            base, _, drop = pattern.partition("+")
            if base == "structured":
                config = StructuredConfig(base, params=args.speed_ratio, drop_layers=int(drop or 0))
            else:
                config = StructuredConfig(base, sparsity=args.speed_ratio)
            pruned, report = prune_structured(copy.deepcopy(model), config, calibration)
            ppl = perplexity(pruned, windows)
            with tempfile.TemporaryDirectory() as folder:
                pruned.save_pretrained(folder)
                disk = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6
            # Dense and pruned alternate, round after round, so drift of the machine hits both
            # alike; the speed-up is the median of the rounds' ratios.
            dense_speed, pruned_speed = [], []
            for _ in range(args.speed_rounds):
                dense_speed.append(decode_speed(model, tokenizer, args.decode_tokens)["tokens_per_s"])
                pruned_speed.append(decode_speed(pruned, tokenizer, args.decode_tokens)["tokens_per_s"])
            ratios = [p / d for p, d in zip(pruned_speed, dense_speed, strict=True)]
            d, p, r = statistics.median(dense_speed), statistics.median(pruned_speed), statistics.median(ratios)
            # At batch 1 every weight is read once per token (the tied lm_head in full), so on a
            # memory-bound CPU the weight bytes bound the speed-up.
            bound = weights_bytes(model) / weights_bytes(pruned)
            speed_rows.append({"pattern": pattern, "layers": report.layers_after, "heads": report.heads_after,
                               "intermediate": report.intermediate_after,
                               "removed": report.layer_params_removed, "ppl": ppl,
                               "disk_mb": disk, "tokens_per_s": p, "dense_tokens_per_s": d, "speedup": r,
                               "speedup_rounds": ratios, "weights_bytes_ratio": bound})
            print(f"{pattern:<14} {report.layers_after:>6} {report.heads_after:>5} {report.intermediate_after:>5} "
                  f"{report.layer_params_removed:>8.1%} {ppl:>9.2f} {disk:>8.1f} {p:>7.1f} {d:>12.1f} "
                  f"{r:>7.2f}x {min(ratios):>5.2f}-{max(ratios):.2f} {bound:>10.3f}x", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"threads": torch.get_num_threads(), "layer_params": layer_params, "quality": rows, "speed": speed_rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    written = [out.with_suffix(".json")]
    if len(rows) > 1:
        plot(rows, out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    if speed_rows:
        speed_path = out.with_name(out.name + "-speed.png")
        plot_speed(speed_rows, rows[0]["ppl"], speed_path, args.speed_ratio)
        written.append(speed_path)
    print(f"\nwrote {', '.join(str(p) for p in written)}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r for r in rows if r["score"] == "dense")
    for score in dict.fromkeys(r["score"] for r in rows if r["score"] != "dense"):
        points = sorted((r["removed"], r["ppl"]) for r in rows if r["score"] == score)
        xs, ys = zip(*[(0.0, dense["ppl"]), *points], strict=True)
        ax.plot([100 * x for x in xs], ys, marker="o", label=score)
    # Magnitude collapses by orders of magnitude; cap the axis so the others stay readable.
    finite = [r["ppl"] for r in rows if r["ppl"] < 1e3]
    top = max(finite) * 3 if finite else None
    if top is not None and any(r["ppl"] > top for r in rows):
        ax.set_ylim(min(r["ppl"] for r in rows) * 0.8, top)
        off = sorted({r["score"] for r in rows if r["ppl"] > top})
        ax.text(0.02, 0.97, f"off scale: {', '.join(off)}", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xlabel("decoder-layer parameters removed (%)")
    ax.set_ylabel("perplexity (Wikipedia eval, 20 x 512)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M, structured pruning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_speed(rows: list[dict[str, Any]], dense_ppl: float, path: Path, ratio: float) -> None:
    """Perplexity against decode speed-up at one ratio: the depth/width trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([1.0], [dense_ppl], color="black", zorder=3)
    ax.annotate("dense", (1.0, dense_ppl), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for r in rows:
        low, high = min(r["speedup_rounds"]), max(r["speedup_rounds"])
        ax.errorbar([r["speedup"]], [r["ppl"]], xerr=[[r["speedup"] - low], [high - r["speedup"]]],
                    fmt="o", capsize=3, label=f"{r['pattern']}: {r['layers']} layers, {r['removed']:.1%}")
    # Every structured+K row removes the same parameters, so they share one bytes ratio.
    bound = next((r["weights_bytes_ratio"] for r in rows if r["pattern"].startswith("structured")), None)
    if bound is not None:
        ax.axvline(bound, color="grey", linestyle="--", linewidth=1)
        ax.text(bound, 0.03, " width-only bound\n (weight bytes)", transform=ax.get_xaxis_transform(),
                va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("decode speed-up over dense (median of rounds; bars: range)")
    ax.set_ylabel("perplexity (Wikipedia eval, 20 x 512)")
    ax.set_yscale("log")
    ax.set_title(f"SmolLM2-135M, about {ratio:.0%} of decoder-layer parameters removed", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
