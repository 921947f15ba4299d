"""Command line: a thin argparse layer over :mod:`llmprune.jobs.pipeline`.

    llmprune --model smollm2-135m --sparsity 0.5 --pattern 2:4 --method sparsegpt --out ./s24
    llmprune eval ./s24
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmprune import __version__
from llmprune.cli.common import THREADS_BEFORE, Bars, Help, exec_args, setup, write_result
from llmprune.cli.service import COMMANDS as SERVICE_COMMANDS
from llmprune.errors import LlmpruneError
from llmprune.progress import Event

PATTERN_HELP = ("'unstructured', N:M = N weights KEPT in every M consecutive ones (2:4 = 50%% zeros), or a structure "
                "that makes the model smaller: heads, channels (MLP), structured (both, by --params), layers, "
                "experts (whole experts of every MoE layer; --method reap, reap-sum, frequency or random)")
SUBCOMMANDS = """subcommands:
  llmprune eval MODEL    perplexity and lm-eval tasks of a saved (or any) model
  llmprune push DIR      upload a pruned checkpoint to the Hugging Face Hub
  llmprune sweep         a grid of methods x sparsities x patterns, with a table and a plot
  llmprune analyze sensitivity|saliency
                         per-layer sensitivity curves; saliency criteria against the exact oracle
  llmprune serve         run pruning jobs for a team over HTTP (--workdir DIR)
  llmprune submit RECIPE a job to a server; jobs, status ID, logs ID [-f], cancel ID, fetch ID DIR
  (llmprune SUBCOMMAND --help for each)"""


def _parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=Help)
    p.add_argument("--version", action="version", version=f"llmprune {__version__}")
    return p


def _prune_parser() -> argparse.ArgumentParser:
    p = _parser("llmprune", "Prune the linear layers of a Hugging Face causal LM, one decoder layer at a time.",
                SUBCOMMANDS)
    p.add_argument("--model", default=None,
                   help="smollm2-135m (built in, offline), a folder, a .gguf, or a Hub id (required unless a "
                   "--recipe names it)")
    p.add_argument("--recipe", default=None, help="a YAML recipe (see recipes/); flags given as well override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set calibration.samples=64 (repeatable)")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default=None,
                   help="magnitude | wanda | ria (Wanda's input norms, |W| relative to its row and column) | "
                   "sparsegpt | admm (mask chosen inside ADMM least-squares "
                   "iterations) | obd (1/2 F w^2, diagonal Fisher of the calibration loss) | taylor (|g w|); "
                   "none named: the default recipe for the pattern and sparsity (README); "
                   "structured patterns: obs (default) | magnitude | wanda-sp | flap | taylor | obd; "
                   "--pattern experts: reap (default) | reap-sum (summed, not averaged, over routed tokens) | "
                   "frequency | random")
    g.add_argument("--sparsity", type=float, default=None,
                   help="fraction of zeros in [0, 1) (default 0.5; implied by an N:M pattern); for heads, "
                   "channels and layers the fraction of them to remove")
    g.add_argument("--params", type=float, default=None,
                   help="--pattern structured: fraction of decoder-layer parameters to remove")
    g.add_argument("--drop-layers", type=int, default=0, metavar="K",
                   help="--pattern structured: also drop K whole decoder layers (least block influence); "
                   "heads and channels remove the rest of --params (default 0: width only)")
    g.add_argument("--bridge", action=argparse.BooleanOptionalAction, default=True,
                   help="with --drop-layers: refit the down_proj before each dropped run to carry what it "
                   "added (default; --no-bridge turns it off)")
    g.add_argument("--then-sparsity", type=float, default=None, metavar="S",
                   help="--pattern experts: then prune what is left to this unstructured sparsity (default recipe)")
    g.add_argument("--kv", choices=["query", "groups"], default="query",
                   help="heads under grouped-query attention: the same number of query heads from every KV "
                   "group (default), or whole KV groups")
    g.add_argument("--saliency", default=None, metavar="PATH",
                   help="structured patterns: put the correlation table of this saliency.json (`llmprune analyze "
                   "saliency`) into the model card")
    g.add_argument("--decode-tokens", type=int, default=64,
                   help="structured patterns: tokens generated to measure decode speed before/after (0 = skip)")
    g.add_argument("--pattern", default="unstructured", help=PATTERN_HELP)
    g.add_argument("--allow-partial", action="store_true",
                   help="prune the linear layers even when the decoder layers hold weights no method can prune "
                   "(fused mixture-of-experts weights); both sparsities are reported")
    g.add_argument("--expert-statistics", choices=["routed", "weighted", "all"], default="routed",
                   help="mixture-of-experts layers: each expert's statistics from the tokens routed to it, the "
                   "same weighted by routing weight, or all tokens (as --calibrate-all-experts)")
    g.add_argument("--calibrate-all-experts", action="store_const", const="all", dest="expert_statistics",
                   help="every expert's statistics from every calibration token, as if each were routed to it "
                   "(the layer's output still uses only the routed ones)")
    g.add_argument("--min-expert-tokens", type=int, default=32, metavar="N",
                   help="an expert with fewer calibration tokens is pruned by magnitude (recorded)")
    g.add_argument("--group", choices=["row", "layer", "global"], default=None,
                   help="comparison group of unstructured masks; global: every weight of every layer at once "
                   "(magnitude, obd, taylor) (default: the method's reference choice)")
    g.add_argument("--update", choices=["none", "obs", "admm"], default=None,
                   help="refit the kept weights after any mask: 'obs' (SparseGPT's one-pass update) or 'admm' "
                   "(the least-squares refit on the mask: ADMM, then conjugate gradients, 10 steps; "
                   "the default recipe's stops at 4; --set prune.cg_iterations=N)")
    g.add_argument("--refine", choices=["none", "dsnot"], default=None,
                   help="'dsnot': refine the mask by DSnoT's training-free prune-and-grow before the update")
    g.add_argument("--recover", choices=["none", "blockwise"], default=None,
                   help="'blockwise': after each decoder layer is pruned, train its kept weights to reproduce the "
                   "dense layer's outputs (attention, then MLP; zeros kept; kept only if a held-out batch improves)")
    g.add_argument("--schedule", default=None, metavar="S1,S2,...",
                   help="iterative pruning: each layer pruned to these rising sparsities in turn, the last the target "
                   "(with --recover blockwise: recovery after each step), e.g. 0.3,0.5,0.7")
    g.add_argument("--allocation", choices=["uniform", "owl", "sensitivity"], default=None,
                   help="layer sparsities: uniform, owl (by each layer's outlier ratio on the dense model) or "
                   "sensitivity (from the curves of --sensitivity), the mean exactly --sparsity; unstructured only")
    g.add_argument("--sensitivity", default=None, metavar="PATH",
                   help="with --allocation sensitivity: the sensitivity.json of `llmprune analyze sensitivity`")
    g.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diag H")
    g.add_argument("--shrink", type=float, default=None,
                   help="Hessian shrinkage toward its diagonal for the OBS and least-squares updates, in [0, 1] "
                   "(default 0.1 with --method, the default recipe's own without; 0 = plain SparseGPT)")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="true-sequential (default): prune q/k/v, then o, gate/up, down, each from inputs "
                   "through the already pruned ones (one forward pass per layer when the calibration fits "
                   "one batch); --no-sequential prunes all from the dense layer, as the reference code")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="wikipedia",
                   help="wikipedia (offline), pydoc, wikitext2, c4, ptb, or a .txt/.jsonl")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    c.add_argument("--generated", type=int, default=None, metavar="K",
                   help="replace the first K windows with text the dense model samples, in pieces of about 128 tokens "
                   "each started from 4 real tokens "
                   "(default: a quarter of them with the default recipe in memory, else 0)")
    c.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: min(2048, model limit))")
    c.add_argument("--seed", type=int, default=0, help="seed of the windows' random offsets")
    c.add_argument("--batch-size", type=int, default=None,
                   help="calibration samples per forward (default, or 0: auto)")
    e = p.add_argument_group("evaluation")
    _eval_args(e)
    e.add_argument("--eval-tasks", default=None, help="lm-eval tasks run dense and pruned, e.g. arc_easy,hellaswag")
    _task_args(e)
    o = p.add_argument_group("output and execution")
    o.add_argument("--out", default=None, help="folder for the pruned checkpoint (atomic; refused if it exists)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    o.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME", help="upload the saved checkpoint to this repo")
    o.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    exec_args(o)
    m = p.add_argument_group("models larger than memory")
    m.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                   help="read each decoder layer from the safetensors shards and write it pruned to --out as it "
                   "finishes (auto: when the checkpoint takes over half the free memory)")
    m.add_argument("--resume", action="store_true",
                   help="continue an interrupted streaming run from its last complete layer (same settings)")
    m.add_argument("--offload-dir", default=None,
                   help="keep calibration activations in files here instead of memory (streaming)")
    m.add_argument("--device-map", default=None,
                   help="place layers with accelerate: auto, or a max-memory spec such as 0=20GiB,1=20GiB,cpu=64GiB")
    return p


def _eval_args(e: Any, default_source: str | None = "wikipedia") -> None:
    e.add_argument("--eval", default=default_source,
                   help="perplexity text: wikipedia (offline eval split), pydoc, wikitext2, c4, ptb, a file, or none")
    e.add_argument("--eval-seqlen", type=int, default=None, help="window length (default: min(2048, model limit))")
    e.add_argument("--eval-windows", type=int, default=16, help="first N windows (default 16; 0 = all)")
    e.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward")


def _task_args(e: Any) -> None:
    e.add_argument("--tasks-include", default=None, help="a folder of local lm-eval task YAML files")
    e.add_argument("--tasks-limit", "--limit", dest="tasks_limit", type=float, default=None,
                   help="examples per lm-eval task (a count, or a fraction below 1)")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default: the task's)")
    e.add_argument("--tasks-batch-size", type=int, default=8, help="lm-eval batch size")


def _eval_parser() -> argparse.ArgumentParser:
    p = _parser("llmprune eval", "Perplexity and lm-eval tasks of a saved (or any) model.")
    p.add_argument("model", help="a folder, .gguf, built-in name or Hub id")
    _eval_args(p)
    p.add_argument("--ppl", dest="eval", help="same as --eval: the perplexity text (none = skip)")
    p.add_argument("--tasks", default=None, help="lm-eval tasks, e.g. arc_easy,hellaswag")
    _task_args(p)
    exec_args(p)
    return p


def _push_parser() -> argparse.ArgumentParser:
    p = _parser("llmprune push", "Upload a pruned checkpoint to the Hugging Face Hub (token from HF_TOKEN or "
                "`hf auth login`; never printed).")
    p.add_argument("folder", help="an llmprune output folder")
    p.add_argument("--repo", required=True, help="OWNER/NAME of the model repo (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    return p


def _sweep_parser() -> argparse.ArgumentParser:
    p = _parser("llmprune sweep", "Prune a grid of methods x sparsities x patterns, writing a table (JSON, CSV) "
                "and a plot of perplexity against sparsity; rerun the same command to finish an interrupted "
                "sweep. The grid is printed before any work; give --methods, --sparsities and --patterns to "
                "choose it (the defaults are the README's 18-point grid, about 20 minutes on SmolLM2 and 2 cores).")
    p.add_argument("--model", default="smollm2-135m", help="as for llmprune --model")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="comma-separated methods")
    p.add_argument("--sparsities", default="0.3,0.5,0.6,0.7", help="unstructured sparsities (empty: none)")
    p.add_argument("--patterns", default="2:4,4:8", help="N:M patterns (empty: none)")
    p.add_argument("--out", required=True, help="folder for sweep.json, sweep.csv and sweep.png")
    p.add_argument("--calib", default="wikipedia", help="calibration text")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--generated", type=int, default=None, metavar="K",
                   help="calibration windows the dense model writes itself (default: as a single run)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows' random offsets")
    p.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default, or 0: auto)")
    p.add_argument("--eval", default="wikipedia", help="perplexity text")
    p.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length")
    p.add_argument("--eval-windows", type=int, default=20, help="first N windows (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward")
    exec_args(p)
    return p


def _eval_config(args: argparse.Namespace) -> Any:
    from llmprune.jobs.spec import EvalConfig

    source = None if str(args.eval).lower() == "none" else args.eval
    return EvalConfig(source, args.eval_seqlen, args.eval_windows, args.eval_batch_size)


# CLI option (argparse dest) -> recipe key. The CLI builds its job through the same recipe data,
# so a recipe and the equivalent flags give the same job.
FLAG_KEYS = {
    "model": "model", "pattern": "prune.pattern", "sparsity": "prune.sparsity", "params": "prune.params",
    "drop_layers": "prune.drop_layers", "bridge": "prune.bridge", "kv": "prune.kv", "group": "prune.group",
    "update": "prune.update", "blocksize": "prune.blocksize",
    "shrink": "prune.shrink",
    "damp": "prune.damp", "sequential": "prune.sequential", "calib": "calibration.source",
    "nsamples": "calibration.samples", "generated": "calibration.generated",
    "seqlen": "calibration.seqlen", "seed": "calibration.seed",
    "batch_size": "batch_size", "eval": "evaluation.source", "eval_seqlen": "evaluation.seqlen",
    "eval_windows": "evaluation.windows", "eval_batch_size": "evaluation.batch_size", "out": "out",
    "overwrite": "overwrite", "device": "device", "dtype": "dtype", "decode_tokens": "decode_tokens",
    "stream": "stream", "resume": "resume", "offload_dir": "offload_dir", "device_map": "device_map",
    "eval_tasks": "tasks.names", "tasks_include": "tasks.include", "tasks_limit": "tasks.limit",
    "num_fewshot": "tasks.num_fewshot", "tasks_batch_size": "tasks.batch_size", "push_to_hub": "push_to_hub",
    "private": "private", "allow_partial": "prune.allow_partial", "refine": "prune.refine",
    "allocation": "prune.allocation", "sensitivity": "prune.sensitivity", "recover": "prune.recover",
    "schedule": "prune.schedule",
    "expert_statistics": "prune.expert_statistics", "min_expert_tokens": "prune.min_expert_tokens",
    "then_sparsity": "prune.then_sparsity", "saliency": "saliency",
}
# Options that only one kind of pruning takes: left out of the other kind's data unless given.
ONLY_UNSTRUCTURED = {"group", "update", "blocksize", "shrink", "allow_partial", "refine", "allocation", "sensitivity",
                     "recover",
                     "schedule", "expert_statistics", "min_expert_tokens"}
ONLY_STRUCTURED = {"params", "drop_layers", "bridge", "kv", "decode_tokens", "then_sparsity", "saliency"}


def _explicit(argv: Sequence[str]) -> dict[str, Any]:
    """The options the user actually typed (defaults suppressed)."""
    unset = object()  # not a string: argparse would run a string default through the option's type
    parser = _prune_parser()
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.dest not in ("help", "set")})
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not unset and k != "set"}


def job_data(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Recipe data for this command line: the recipe (if any), the flags, then ``--set``."""
    from llmprune.jobs.recipe import apply_set, read_recipe
    from llmprune.structured.run import STRUCTURES

    explicit = _explicit(argv)
    data: dict[str, Any] = read_recipe(args.recipe) if args.recipe else {}
    given = explicit if args.recipe else {**vars(args), **explicit}
    pattern = given.get("pattern", (data.get("prune") or {}).get("pattern", "unstructured"))
    structured = pattern in STRUCTURES
    for dest, value in given.items():
        key = FLAG_KEYS.get(dest)
        if key is None or (dest not in explicit and (
                (structured and dest in ONLY_UNSTRUCTURED) or (not structured and dest in ONLY_STRUCTURED))):
            continue
        if dest == "params" and not structured and value is not None:
            raise LlmpruneError("--params applies to --pattern structured; use --sparsity")
        if dest in ("drop_layers", "bridge") and not structured:
            raise LlmpruneError(f"--{dest.replace('_', '-')} applies to --pattern structured")
        if dest == "eval" and str(value).lower() == "none":
            value = None
        if dest == "schedule" and value is not None:
            try:
                value = [float(x) for x in str(value).split(",") if x.strip()]
            except ValueError:
                raise LlmpruneError(f"--schedule takes sparsities separated by commas, e.g. 0.3,0.5,0.7; "
                                    f"got {value!r}") from None
        if dest == "eval_tasks":
            value = [t.strip() for t in value.split(",") if t.strip()] if value else []
        head, _, rest = key.partition(".")
        if rest:
            data.setdefault(head, {})[rest] = value
        else:
            data[key] = value
    method = explicit.get("method", None if args.recipe else args.method)
    if method is not None:
        data.setdefault("prune", {})["score" if structured else "method"] = method
    for assignment in args.set:
        apply_set(data, assignment)
    if not data.get("model"):
        raise LlmpruneError("give --model (or a --recipe that names one)")
    return data


def cmd_prune(argv: Sequence[str]) -> int:
    args = _prune_parser().parse_args(argv)
    setup(args)
    from llmprune.jobs.pipeline import run
    from llmprune.jobs.recipe import job_from_dict

    if args.decode_tokens < 0:
        raise LlmpruneError(f"--decode-tokens must be >= 0, got {args.decode_tokens}")
    job = job_from_dict(job_data(args, argv), origin=f"recipe {args.recipe}" if args.recipe else None)
    from llmprune.jobs.pipeline import check_job, streaming_source

    out = check_job(job)  # before streaming_source, which may download a Hub snapshot
    if args.json and out is not None and Path(args.json).expanduser().resolve().is_relative_to(out):
        raise LlmpruneError(f"--json {args.json} is inside --out {out}, which the run replaces; write it elsewhere")
    from llmprune.io.memory import return_freed_memory

    if streaming_source(job) is not None:  # memory is the point of streaming: trade speed for it
        return_freed_memory()

    def saved(record: dict[str, Any]) -> None:  # before any push, which may fail
        print(summary(record), flush=True)
        if record.get("tasks"):
            print(tasks_summary(record["tasks"]["dense"], record["tasks"]["pruned"]), flush=True)
        write_result(args, record)

    record = run(job, progress=Bars(args.quiet), command=["llmprune", *argv], on_saved=saved)
    if record.get("pushed_to"):
        print(f"pushed to {record['pushed_to']}")
        write_result(args, record)
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    args = _eval_parser().parse_args(argv)
    setup(args)
    from llmprune.engine.driver import resolve_device
    from llmprune.io.loading import load
    from llmprune.jobs.pipeline import evaluate_ppl

    config = _eval_config(args)
    names = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    if config.source is None and not names:
        raise LlmpruneError("llmprune eval needs a perplexity text (--eval/--ppl) or --tasks")
    manager = None
    if names:
        from llmprune.eval.tasks import check_tasks

        manager = check_tasks(names, args.tasks_include)
    model, tokenizer = load(args.model, args.dtype)
    device = resolve_device(args.device)
    bars = Bars(args.quiet)
    result: dict[str, Any] = {"model": args.model}
    if config.source is not None:
        result.update(evaluate_ppl(model, tokenizer, config, device, bars))
        print(f"{'model':<40} {'ppl':>10}   protocol")
        print(f"{args.model:<40} {result['ppl']:>10.3f}   {_protocol(result)}")
    if names:
        from llmprune.eval.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(model, tokenizer, names, include=args.tasks_include,
                                         limit=args.tasks_limit, num_fewshot=args.num_fewshot,
                                         batch_size=args.tasks_batch_size, device=device, manager=manager)
        print(tasks_summary(result["tasks"]))
    write_result(args, result)
    return 0


def tasks_summary(tasks: dict[str, Any], pruned: dict[str, Any] | None = None) -> str:
    """lm-eval results as a table (one model, or dense and pruned side by side)."""
    rows = [f"{'task':<24}{'metric':<12}" + (f"{'dense':>18}{'pruned':>18}" if pruned else f"{'value':>18}")]
    for task, metrics in tasks["results"].items():
        for metric in sorted(m for m in metrics if not m.endswith("_stderr")):
            cells = []
            for side in (tasks, pruned) if pruned else (tasks,):
                row = side["results"].get(task, {})
                value, err = row.get(metric), row.get(f"{metric}_stderr")
                cells.append("" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err else ""))
            rows.append(f"{task:<24}{metric:<12}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(rows)


def cmd_push(argv: Sequence[str]) -> int:
    args = _push_parser().parse_args(argv)
    from pathlib import Path

    from llmprune.io.hub import push

    url = push(Path(args.folder), args.repo, private=args.private)
    print(f"pushed {args.folder} to {url}")
    return 0


def cmd_sweep(argv: Sequence[str]) -> int:
    args = _sweep_parser().parse_args(argv)
    setup(args)
    from llmprune.engine.config import CalibrationConfig
    from llmprune.jobs.spec import EvalConfig
    from llmprune.jobs.sweep import SweepConfig, run_sweep, table

    def floats(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise LlmpruneError(f"--sparsities must be comma-separated numbers, got {text!r}") from None

    config = SweepConfig(
        model=args.model, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        sparsities=floats(args.sparsities), patterns=tuple(p.strip() for p in args.patterns.split(",") if p.strip()),
        calibration=CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed, args.generated),
        evaluation=EvalConfig(None if str(args.eval).lower() == "none" else args.eval, args.eval_seqlen,
                              args.eval_windows, args.eval_batch_size),
        device=args.device, dtype=args.dtype, batch_size=args.batch_size,
    )

    from llmprune.jobs.sweep import point_key

    keys = [point_key(p) for p in config.points()]
    print(f"llmprune sweep: {len(keys)} points on {args.model} ({', '.join(keys)}); finished points in "
          f"{args.out} are reused", file=sys.stderr, flush=True)

    def progress(event: Event) -> None:
        if not args.quiet:
            print(f"[{event.done + 1}/{event.total}] {event.stage}", file=sys.stderr, flush=True)

    record = run_sweep(config, args.out, progress=progress)
    print(table(record))
    print(f"{len(record['points'])} points; this run took {record['seconds_this_run']:.0f} s; "
          f"table and plot in {args.out} (sweep.json, sweep.csv, sweep.png)")
    write_result(args, record)
    return 0


def _ppl_rows(ev: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not ev:
        return []
    return [("ppl dense", f"{ev['ppl_dense']:.3f}"), ("ppl pruned", f"{ev['ppl_pruned']:.3f}"),
            ("ppl protocol", _protocol(ev))]


def _protocol(ev: dict[str, Any]) -> str:
    from llmprune.jobs.card import text_name

    return f"{text_name(ev)}, {ev['windows']} x {ev['seqlen']} tokens" + (", BOS" if ev["bos"] else "")


def summary(record: dict[str, Any]) -> str:
    """The readable results table printed at the end of a run."""
    if record.get("kind") == "structured":
        return structured_summary(record)
    rows = [("model", record["base_model"]),
            ("method", f"{record['method']} {record['pattern']} (update {record['resolved_options']['update']}"
                       f", sequential {record['config']['sequential']})"),
            ("sparsity", f"target {record['sparsity_target']:.2%}, achieved {record['sparsity_achieved']:.2%} of "
                         "all decoder-layer weights" + (
                             f" ({record['sparsity_of_pruned_linears']:.2%} of the pruned linears; "
                             f"{len(record['unpruned_weights'])} weight matrices left dense)"
                             if record.get("unpruned_weights") else "")),
            ("calibration", f"{record['calibration']['source']}, {record['calibration']['samples']} x "
                            f"{record['calibration']['seqlen']} tokens, seed {record['calibration']['seed']}"
                            + _generated(record["calibration"]))]
    rows += _ppl_rows(record.get("evaluation"))
    t = record["timings"]
    rows.append(("pruning time", f"{t['prune_s']:.1f} s on {record['device']}, {record['threads']} threads" + (
        f" (and {t['generate_s']:.1f} s sampling the generated windows)" if "generate_s" in t else "")))
    if record.get("streaming"):
        st = record["streaming"]
        rows.append(("streaming", f"layers read from {st['source']}" + (
            f", resumed after layer {st['resumed_at_layer']}" if st["resumed_at_layer"] else "")))
    if record.get("memory"):
        rows.append(("peak memory", _memory(record["memory"])))
    rows.append(("saved to", record.get("out") or "nothing: no --out was given"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _generated(calibration: dict[str, Any]) -> str:
    count = calibration.get("generated") or 0
    return f"; {count} of the windows written by the dense model" if count else ""


def _memory(memory: dict[str, Any]) -> str:
    text = f"{memory['peak_rss_bytes'] / 1e9:.2f} GB RSS"
    for device, size in (memory.get("peak_device_bytes") or {}).items():
        text += f", {size / 1e9:.2f} GB on {device}"
    return text


def _depth(record: dict[str, Any]) -> str:
    drop = record["config"].get("drop_layers")
    if not drop:
        return ""
    bridged = sum(len(e.get("bridged_layers", [])) for e in record.get("layers", []))
    plural = "s" if drop > 1 else ""
    return f"; depth: {drop} layer{plural} dropped first, {bridged} of them bridged"


def structured_summary(record: dict[str, Any]) -> str:
    st, params = record["structure"], record["parameters"]
    rows = [("model", record["base_model"]),
            ("pruning", f"{record['pattern']} by {record['method']} (target {record['target']:.0%}"
                        f"{_depth(record)})"),
            ("attention heads", f"{st['attention_heads'][0]} -> {st['attention_heads'][1]} "
                                f"({st['kv_heads_after']} KV)"),
            ("MLP width", f"{st['intermediate_size'][0]} -> {st['intermediate_size'][1]}"),
            ("decoder layers", f"{st['decoder_layers'][0]} -> {st['decoder_layers'][1]}"),
            ("parameters", f"{params['before']:,} -> {params['after']:,} "
                           f"({params['decoder_layer_fraction_removed']:.1%} of decoder-layer parameters removed)"),
            ("weights", f"{record['weights_bytes']['before'] / 1e6:.1f} MB -> "
                        f"{record['weights_bytes']['after'] / 1e6:.1f} MB")]
    rows += _ppl_rows(record.get("evaluation"))
    sp = record.get("decode_speed")
    if sp:
        rows.append(("decode speed", f"{sp['tokens_per_s_dense']:.1f} -> {sp['tokens_per_s_pruned']:.1f} tok/s "
                                     f"({sp['speedup']:.2f}x; batch 1, greedy, {sp['new_tokens']} tokens, "
                                     f"{sp['threads']} threads)"))
    if record.get("dropped_layers"):
        rows.append(("dropped layers", ", ".join(str(i) for i in record["dropped_layers"])))
    rows.append(("pruning time", f"{record['timings']['prune_s']:.1f} s on {record['device']}"))
    rows.append(("saved to", f"{record['out']} ({record.get('checkpoint_bytes', 0) / 1e6:.1f} MB safetensors)"
                 if record.get("out") else "nothing: no --out was given"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_analyze(argv: Sequence[str]) -> int:
    from llmprune.cli.analyze import cmd_analyze as analyze

    return analyze(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"prune": cmd_prune, "eval": cmd_eval, "push": cmd_push,
                                                       "sweep": cmd_sweep, "analyze": cmd_analyze,
                                                       **SERVICE_COMMANDS}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, a container stopping), raised where the program is, so
    every cleanup that runs for Ctrl-C runs for it too."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    command: Callable[[Sequence[str]], int] = cmd_prune
    if argv and argv[0] in COMMANDS:
        command = COMMANDS[argv.pop(0)]
    previous = None
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return command(argv)
    except LlmpruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"llmprune: {what}; an unfinished output was removed (a streaming run that finished a layer "
              "keeps it: rerun with --resume)", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if THREADS_BEFORE:  # called in-process (a notebook, a test): --threads lasts one command
            import torch

            torch.set_num_threads(THREADS_BEFORE[0])
            THREADS_BEFORE.clear()
