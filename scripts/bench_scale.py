"""Benchmark: pruning models larger than memory (streaming, activation offload, resume).

    .venv/bin/python scripts/bench_scale.py smol   # SmolLM2-135M: streaming vs in-memory
    .venv/bin/python scripts/bench_scale.py moe    # the SmolLM2 MoE test bed, stored one matrix per expert
    .venv/bin/python scripts/bench_scale.py small  # TinyLlama-1.1B-shaped random fp16 (2.34 GB), peak RSS / model
    .venv/bin/python scripts/bench_scale.py big    # Llama-2-13B-shaped random fp16 (~26 GB), Wanda
    .venv/bin/python scripts/bench_scale.py gpu    # 7B-shaped, SparseGPT on CUDA, device memory bound

Every pruning run is a separate ``llmprune`` process whose peak RSS (and peak device memory) is
read from the ``llmprune.json`` it writes. ``big`` and ``gpu`` generate their checkpoint (random
weights, safetensors, one shard per decoder layer) in a temporary folder and delete it after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def prune(model: str | Path, out: Path, *extra: str, threads: int) -> tuple[dict[str, Any], float]:
    """Run the CLI in its own process; (its record, wall seconds)."""
    record = out.parent / f"{out.name}.json"
    argv = [sys.executable, "-m", "llmprune.cli", "--model", str(model), "--out", str(out), "--overwrite",
            "--json", str(record), "--threads", str(threads), "--quiet", *extra]
    tick = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    return json.loads(record.read_text()), time.perf_counter() - tick


def tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    found: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def compare_streaming(model: str | Path, title: str, args: argparse.Namespace, work: Path) -> None:
    """The same job in memory and streamed: peak RSS, times, and whether the tensors are equal."""
    import torch

    common = ["--method", args.method, "--sparsity", "0.5", "--nsamples", "32", "--seqlen", "512",
              "--eval", "none", "--calib", "wikipedia"]
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = prune(model, work / f"out-{mode}", *common, "--stream", mode, threads=args.threads)
    a, b = tensors(work / "out-off"), tensors(work / "out-on")
    same = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rss = {mode: record["memory"]["peak_rss_bytes"] for mode, (record, _) in runs.items()}
    print(f"{title}, {args.method} 50%, 32 x 512 calibration tokens, {args.threads} threads")
    print(f"{'mode':<12}{'peak RSS':>12}{'prune s':>10}{'wall s':>9}")
    for mode, (record, wall) in runs.items():
        name = "in-memory" if mode == "off" else "streaming"
        print(f"{name:<12}{rss[mode] / 1e9:>10.2f} GB{record['timings']['prune_s']:>10.1f}{wall:>9.1f}")
    print(f"streaming / in-memory peak RSS: {rss['on'] / rss['off']:.2f} (target <= 0.60); "
          f"identical tensors: {same}")


def smol(args: argparse.Namespace, work: Path) -> None:
    compare_streaming("smollm2-135m", "SmolLM2-135M", args, work)


def moe(args: argparse.Namespace, work: Path) -> None:
    """The real-weights MoE test bed, saved as stock save_pretrained saves it (one matrix per
    expert), pruned in memory and streamed."""
    import llmprune
    from llmprune.io.moe_testbed import build_moe

    dense, tokenizer = llmprune.load_model("smollm2-135m")
    router_text = llmprune.calibration_data(tokenizer, "wikipedia", nsamples=32, seqlen=512, seed=1)
    model = build_moe(dense, 8, 2, router_text)
    folder = work / "moe"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model, dense
    c = llmprune.load_model(str(folder))[0].config
    compare_streaming(folder, f"SmolLM2 MoE test bed ({c.shared_expert_intermediate_size}+{c.num_experts}x"
                      f"{c.moe_intermediate_size}, top-{c.num_experts_per_tok})", args, work)


def write_random_checkpoint(folder: Path, hidden: int, intermediate: int, layers: int, heads: int,
                            kv_heads: int | None = None) -> int:
    """A Llama-shaped fp16 checkpoint with random weights, one shard per decoder layer; the
    tokenizer is SmolLM2's (so the vocabulary is 49152). Returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from llmprune.io.loading import resolve

    smol_folder, _ = resolve("smollm2-135m")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_folder)
    vocab = len(tokenizer)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="float16")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    total, weight_map = 0, {}
    shards = layers + 1
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=gen)

    for index in range(shards):
        if index < layers:
            p = f"model.layers.{index}."
            part = {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
                    p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16)}
            kv = hidden // heads * (kv_heads or heads)
            for name, rows in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
                part[p + f"self_attn.{name}.weight"] = randn(rows, hidden)
            part[p + "mlp.gate_proj.weight"] = randn(intermediate, hidden)
            part[p + "mlp.up_proj.weight"] = randn(intermediate, hidden)
            part[p + "mlp.down_proj.weight"] = randn(hidden, intermediate)
        else:
            part = {"model.embed_tokens.weight": randn(vocab, hidden), "lm_head.weight": randn(vocab, hidden),
                    "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update(dict.fromkeys(part, name))
        del part
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    return total


def small(args: argparse.Namespace, work: Path) -> None:
    """The streamed run's peak RSS against the size of the model it prunes."""
    source, out = work / "tinyllama-shaped", work / "pruned"
    size = write_random_checkpoint(source, 2048, 5632, args.layers, 32, kv_heads=4)
    record, wall = prune(source, out, "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4",
                         "--seqlen", "128", "--eval", "none", "--calib", "wikipedia", "--stream", "on",
                         threads=args.threads)
    rss = record["memory"]["peak_rss_bytes"]
    print(f"TinyLlama-1.1B-shaped fp16 ({args.layers} layers, {size / 1e9:.2f} GB of shards), Wanda 50%, "
          f"4 x 128 calibration tokens, --stream on --eval none, {args.threads} threads")
    print(f"peak RSS {rss / 1e9:.2f} GB = {rss / size:.2f} x the model (target <= 0.40); wall {wall:.0f} s")


def big(args: argparse.Namespace, work: Path) -> None:
    from llmprune.io.memory import available_bytes

    source, out = work / "llama-13b-shaped", work / "pruned"
    tick = time.perf_counter()
    size = write_random_checkpoint(source, 5120, 13824, args.layers, 40)
    print(f"generated {size / 1e9:.1f} GB of fp16 weights ({args.layers} layers) in "
          f"{time.perf_counter() - tick:.0f} s; memory available: {(available_bytes() or 0) / 1e9:.1f} GB")
    record, wall = prune(source, out, "--method", "wanda", "--sparsity", "0.5", "--nsamples", "8",
                         "--seqlen", "256", "--eval", "none", "--calib", "wikipedia", "--stream", args.stream,
                         threads=args.threads)
    layer_s = record["layer_seconds"]
    print(f"Llama-2-13B-shaped, Wanda 50%, 8 x 256 calibration tokens, {args.threads} threads, "
          f"streaming={record.get('streaming') is not None}")
    print(f"peak RSS {record['memory']['peak_rss_bytes'] / 1e9:.2f} GB (target <= 6 GB); wall {wall:.0f} s; "
          f"pruning {record['timings']['prune_s']:.0f} s; per layer mean {sum(layer_s) / len(layer_s):.1f} s, "
          f"min {min(layer_s):.1f} s, max {max(layer_s):.1f} s; sparsity {record['sparsity_achieved']:.4f}; "
          f"output {record['checkpoint_bytes'] / 1e9:.1f} GB")


def gpu(args: argparse.Namespace, work: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu: no CUDA device here; nothing measured")
        return
    hidden, intermediate, layers = 4096, 11008, args.layers
    source, out = work / "llama-7b-shaped", work / "pruned"
    write_random_checkpoint(source, hidden, intermediate, layers, 32)
    nsamples, seqlen = 128, 2048
    record, wall = prune(source, out, "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", str(nsamples),
                         "--seqlen", str(seqlen), "--eval", "none", "--calib", "wikipedia", "--stream", "on",
                         "--device", "cuda", threads=args.threads)
    peak = max(record["memory"]["peak_device_bytes"].values())
    layer = (4 * hidden * hidden + 3 * hidden * intermediate) * 2
    hessians = (3 * hidden * hidden + intermediate * intermediate) * 4
    batch = record["calibration"]["batch_size"]
    activations = batch * seqlen * (2 * hidden + 3 * intermediate) * 4  # one batch in flight, fp32 worst case
    bound = layer + hessians + activations
    print(f"7B-shaped SparseGPT 50%, {nsamples} x {seqlen} tokens on {record['device']}: peak device memory "
          f"{peak / 1e9:.2f} GB against one layer {layer / 1e9:.2f} + Hessians {hessians / 1e9:.2f} + "
          f"activations of a batch {activations / 1e9:.2f} = {bound / 1e9:.2f} GB; wall {wall:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["smol", "moe", "small", "big", "gpu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="wanda", help="smol: the method compared")
    parser.add_argument("--layers", type=int, default=None, help="small: 22, big: 40, gpu: 32 (fewer for a quick look)")
    parser.add_argument("--stream", default="auto", help="big: auto (streams when larger than memory), on, off")
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder)")
    args = parser.parse_args()
    if args.layers is None:
        args.layers = {"small": 22, "gpu": 32}.get(args.part, 40)
    work = Path(tempfile.mkdtemp(prefix="llmprune-scale-", dir=args.workdir))
    try:
        {"smol": smol, "moe": moe, "small": small, "big": big, "gpu": gpu}[args.part](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
