"""Benchmark: the network-loss saliencies (OBD, first-order Taylor) against magnitude, Wanda and
SparseGPT on SmolLM2-135M, at 50% unstructured and 2:4.

Calibration: Wikipedia 32 x 512 (the calibration split); perplexity: the first 20 non-overlapping
512-token windows of the held-out Wikipedia evaluation split. The gradients are computed once
(dense model) and shared by every OBD/Taylor row; each row starts from the dense weights.

    .venv/bin/python scripts/bench_obd.py --json bench-obd.json
"""

from __future__ import annotations

import argparse
import json
import time

ROWS = [
    ("magnitude", "unstructured", None), ("wanda", "unstructured", None), ("sparsegpt", "unstructured", None),
    ("obd", "unstructured", "layer"), ("obd", "unstructured", "row"), ("obd", "unstructured", "global"),
    ("taylor", "unstructured", "layer"), ("taylor", "unstructured", "global"),
    ("magnitude", "2:4", None), ("wanda", "2:4", None), ("sparsegpt", "2:4", None), ("obd", "2:4", None),
    ("taylor", "2:4", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rows", default=None, help="comma-separated indices of ROWS to run (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import llmprune
    from llmprune.engine.gradients import loss_gradients
    from llmprune.engine.model import find_decoder_layers
    from llmprune.eval.perplexity import perplexity
    from llmprune.io.data import evaluation_data

    model, tokenizer = llmprune.load_model("smollm2-135m")
    calibration = llmprune.calibration_data(tokenizer, "wikipedia", args.nsamples, args.seqlen, 0)
    windows = evaluation_data(tokenizer, "wikipedia", 512, 20)
    layers = find_decoder_layers(model)[1]
    dense = {k: v.clone() for k, v in layers.state_dict().items()}
    tick = time.perf_counter()
    gradients = loss_gradients(model, calibration, torch.device("cpu"))
    grad_s = time.perf_counter() - tick
    results = [{"method": "dense", "pattern": "-", "group": "-", "ppl": perplexity(model, windows)}]
    print(f"SmolLM2-135M; calibration wikipedia {args.nsamples} x {args.seqlen}; ppl wikipedia eval 20 x 512; "
          f"gradients {grad_s:.0f} s (once); {torch.get_num_threads()} threads", flush=True)
    print(f"{'method':<10} {'pattern':<13} {'group':<7} {'ppl':>9} {'prune s':>8}", flush=True)
    print(f"{'dense':<10} {'-':<13} {'-':<7} {results[0]['ppl']:>9.2f}", flush=True)
    chosen = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    for method, pattern, group in chosen:
        layers.load_state_dict(dense)
        config = llmprune.PruneConfig(method=method, pattern=pattern, sparsity=0.5 if pattern == "unstructured"
                                      else None, group=group)
        tick = time.perf_counter()
        report = llmprune.prune(model, config, calibration, device="cpu", gradients=gradients)
        seconds = time.perf_counter() - tick
        row = {"method": method, "pattern": pattern, "group": config.options().group, "ppl": perplexity(model, windows),
               "sparsity": report.sparsity, "prune_s": seconds}
        results.append(row)
        print(f"{method:<10} {pattern:<13} {row['group']:<7} {row['ppl']:>9.2f} {seconds:>8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"gradients_s": grad_s, "rows": results}, handle, indent=2)


if __name__ == "__main__":
    main()
