"""Command line: a thin argparse layer over :mod:`llmprune.job`.

    llmprune --model smollm2-135m --sparsity 0.5 --pattern 2:4 --method sparsegpt --out ./s24
    llmprune eval ./s24
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from llmprune.errors import LlmpruneError

PATTERN_HELP = ("'unstructured', N:M = N weights KEPT in every M consecutive ones (2:4 = 50%% zeros), or a structure "
                "that makes the model smaller: heads, channels (MLP), structured (both, by --params), layers")
STRUCTURES = ("heads", "channels", "structured", "layers")


def _prune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmprune",
        description="Prune the linear layers of a Hugging Face causal LM, one decoder layer at a time. "
        "Subcommand: 'llmprune eval DIR' measures a saved model.",
    )
    p.add_argument("--model", required=True,
                   help="smollm2-135m (built in, offline), a folder, a .gguf, or a Hub id")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default=None,
                   help="magnitude | wanda | sparsegpt (default); structured patterns: obs (default) | "
                   "magnitude | wanda-sp | flap | taylor")
    g.add_argument("--sparsity", type=float, default=None,
                   help="fraction of zeros in [0, 1) (default 0.5; implied by an N:M pattern); for heads, "
                   "channels and layers the fraction of them to remove")
    g.add_argument("--params", type=float, default=None,
                   help="--pattern structured: fraction of decoder-layer parameters to remove")
    g.add_argument("--kv", choices=["query", "groups"], default="query",
                   help="heads under grouped-query attention: the same number of query heads from every KV "
                   "group (default), or whole KV groups")
    g.add_argument("--decode-tokens", type=int, default=64,
                   help="structured patterns: tokens generated to measure decode speed before/after (0 = skip)")
    g.add_argument("--pattern", default="unstructured", help=PATTERN_HELP)
    g.add_argument("--group", choices=["row", "layer"], default=None,
                   help="comparison group of unstructured masks (default: the method's reference choice)")
    g.add_argument("--update", choices=["none", "obs"], default=None,
                   help="'obs': refit kept weights with SparseGPT's OBS update after any mask")
    g.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block (128)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diag (0.01)")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="true-sequential (default): prune q/k/v, then o, gate/up, down, each from inputs "
                   "through the already pruned ones (one forward pass per layer when the calibration fits "
                   "one batch); --no-sequential prunes all from the dense layer, as the reference code")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="wikipedia",
                   help="wikipedia (offline), pydoc, wikitext2, c4, ptb, or a .txt/.jsonl")
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=None, help="default: min(2048, model limit)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default: auto)")
    e = p.add_argument_group("evaluation")
    _eval_args(e)
    o = p.add_argument_group("output and execution")
    o.add_argument("--out", default=None, help="folder for the pruned checkpoint (atomic; refused if it exists)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _exec_args(o)
    return p


def _eval_args(e: Any, default_source: str | None = "wikipedia") -> None:
    e.add_argument("--eval", default=default_source,
                   help="perplexity text: wikipedia (offline eval split), pydoc, wikitext2, c4, ptb, a file, or none")
    e.add_argument("--eval-seqlen", type=int, default=None, help="window length (default: min(2048, model limit))")
    e.add_argument("--eval-windows", type=int, default=16, help="first N windows (default 16; 0 = all)")
    e.add_argument("--eval-batch-size", type=int, default=1)


def _exec_args(o: Any) -> None:
    o.add_argument("--device", default="auto",
                   help="where each layer is processed: auto (CUDA if present), cpu, cuda:1")
    o.add_argument("--dtype", default="auto", help="auto (keep the checkpoint's), float32, bfloat16, float16")
    o.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    o.add_argument("--json", default=None, help="also write the results record to this file")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmprune eval", description="Perplexity of a saved (or any) model.")
    p.add_argument("model", help="a folder, .gguf, built-in name or Hub id")
    _eval_args(p)
    _exec_args(p)
    return p


class _Bars:
    """One tqdm bar per stage; the pruning bar counts decoder layers."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        unit = "layer" if stage == "prune" else "window"
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="llmprune: %(levelname)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _eval_config(args: argparse.Namespace) -> Any:
    from llmprune.job import EvalConfig

    source = None if str(args.eval).lower() == "none" else args.eval
    return EvalConfig(source, args.eval_seqlen, args.eval_windows, args.eval_batch_size)


def cmd_prune(argv: Sequence[str]) -> int:
    args = _prune_parser().parse_args(argv)
    _setup(args)
    from llmprune.config import CalibrationConfig, PruneConfig
    from llmprune.job import Job, run

    prune: Any
    if args.pattern in STRUCTURES:
        from llmprune.structured.run import StructuredConfig

        prune = StructuredConfig(args.pattern, args.sparsity, args.params, args.method or "obs", args.kv,
                                 args.damp, args.sequential)
    else:
        if args.params is not None:
            raise LlmpruneError("--params applies to --pattern structured; use --sparsity")
        sparsity = args.sparsity if args.sparsity is not None else (None if ":" in args.pattern else 0.5)
        prune = PruneConfig(args.method or "sparsegpt", args.pattern, sparsity, args.group, args.update,
                            args.blocksize, args.damp, args.sequential)
    if args.decode_tokens < 0:
        raise LlmpruneError(f"--decode-tokens must be >= 0, got {args.decode_tokens}")
    job = Job(
        model=args.model,
        prune=prune,
        calibration=CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed),
        evaluation=_eval_config(args),
        out=args.out, overwrite=args.overwrite, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, decode_tokens=args.decode_tokens,
    )
    record = run(job, progress=_Bars(args.quiet), command=["llmprune", *argv])
    print(summary(record))
    _write_json(args, record)
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    args = _eval_parser().parse_args(argv)
    _setup(args)
    from llmprune.driver import resolve_device
    from llmprune.job import evaluate_ppl
    from llmprune.loading import load

    config = _eval_config(args)
    if config.source is None:
        raise LlmpruneError("llmprune eval needs an --eval text")
    model, tokenizer = load(args.model, args.dtype)
    bars = _Bars(args.quiet)
    result = evaluate_ppl(model, tokenizer, config, resolve_device(args.device),
                          lambda done, total: bars("eval", done, total))
    result["model"] = args.model
    print(f"{'model':<40} {'ppl':>10}   protocol")
    print(f"{args.model:<40} {result['ppl']:>10.3f}   {_protocol(result)}")
    _write_json(args, result)
    return 0


def _protocol(ev: dict[str, Any]) -> str:
    return f"{ev['source']} eval split, {ev['windows']} x {ev['seqlen']} tokens" + (", BOS" if ev["bos"] else "")


def summary(record: dict[str, Any]) -> str:
    """The readable results table printed at the end of a run."""
    if record.get("kind") == "structured":
        return structured_summary(record)
    rows = [("model", record["base_model"]),
            ("method", f"{record['method']} {record['pattern']} (update {record['resolved_options']['update']}"
                       f", sequential {record['config']['sequential']})"),
            ("sparsity", f"target {record['sparsity_target']:.2%}, achieved {record['sparsity_achieved']:.2%}"),
            ("calibration", f"{record['calibration']['source']}, {record['calibration']['nsamples']} x "
                            f"{record['calibration']['seqlen']} tokens, seed {record['calibration']['seed']}")]
    ev = record.get("evaluation")
    if ev:
        rows += [("ppl dense", f"{ev['ppl_dense']:.3f}"), ("ppl pruned", f"{ev['ppl_pruned']:.3f}"),
                 ("ppl protocol", _protocol(ev))]
    t = record["timings"]
    rows.append(("pruning time", f"{t['prune_s']:.1f} s on {record['device']}, {record['threads']} threads"))
    if record.get("out"):
        rows.append(("saved to", record["out"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def structured_summary(record: dict[str, Any]) -> str:
    st, params = record["structure"], record["parameters"]
    rows = [("model", record["base_model"]),
            ("pruning", f"{record['pattern']} by {record['method']} (target {record['target']:.0%})"),
            ("attention heads", f"{st['attention_heads'][0]} -> {st['attention_heads'][1]} "
                                f"({st['kv_heads_after']} KV)"),
            ("MLP width", f"{st['intermediate_size'][0]} -> {st['intermediate_size'][1]}"),
            ("decoder layers", f"{st['decoder_layers'][0]} -> {st['decoder_layers'][1]}"),
            ("parameters", f"{params['before']:,} -> {params['after']:,} "
                           f"({params['decoder_layer_fraction_removed']:.1%} of decoder-layer parameters removed)"),
            ("weights", f"{record['weights_bytes']['before'] / 1e6:.1f} MB -> "
                        f"{record['weights_bytes']['after'] / 1e6:.1f} MB")]
    ev = record.get("evaluation")
    if ev:
        rows += [("ppl dense", f"{ev['ppl_dense']:.3f}"), ("ppl pruned", f"{ev['ppl_pruned']:.3f}"),
                 ("ppl protocol", _protocol(ev))]
    sp = record.get("decode_speed")
    if sp:
        rows.append(("decode speed", f"{sp['tokens_per_s_dense']:.1f} -> {sp['tokens_per_s_pruned']:.1f} tok/s "
                                     f"({sp['speedup']:.2f}x; batch 1, greedy, {sp['new_tokens']} tokens, "
                                     f"{sp['threads']} threads)"))
    rows.append(("pruning time", f"{record['timings']['prune_s']:.1f} s on {record['device']}"))
    if record.get("out"):
        rows.append(("saved to", f"{record['out']} ({record.get('checkpoint_bytes', 0) / 1e6:.1f} MB safetensors)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _write_json(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.json:
        from llmprune.export import write_json

        write_json(args.json, record)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"prune": cmd_prune, "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: Callable[[Sequence[str]], int] = cmd_prune
    if argv and argv[0] in COMMANDS:
        command = COMMANDS[argv.pop(0)]
    try:
        return command(argv)
    except LlmpruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
