"""``llmprune analyze sensitivity|saliency``: the analyses of :mod:`llmprune.analysis` on a model,
their files written to one folder (published whole at the end, or not at all).

    llmprune analyze sensitivity --model smollm2-135m --method wanda --ratios 0.3,0.5,0.7,0.9 --out ./sens
    llmprune analyze saliency --model smollm2-135m --units heads,channels --layers 0,14,29 --out ./sal
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from llmprune.errors import LlmpruneError

USAGE = "llmprune analyze sensitivity|saliency [options]   (llmprune analyze KIND --help for each)"


def _numbers(text: str, what: str, kind: type = float) -> tuple[Any, ...]:
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LlmpruneError(f"--{what} takes comma-separated {'integers' if kind is int else 'numbers'}, "
                            f"got {text!r}") from None
    if not values:
        raise LlmpruneError(f"--{what} is empty")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    from llmprune.cli.common import exec_args

    p.add_argument("--model", default="smollm2-135m", help="as for llmprune --model")
    p.add_argument("--out", required=True, help="folder for the results (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out written by llmprune")
    p.add_argument("--calib", default="wikipedia", help="calibration text")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows' random offsets")
    p.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default: auto)")
    exec_args(p)


def _sensitivity_parser() -> argparse.ArgumentParser:
    from llmprune.cli.common import Help

    p = argparse.ArgumentParser(prog="llmprune analyze sensitivity", formatter_class=Help, description=(
        "Prune one decoder layer (or one kind of linear in every layer) at a time, at each ratio, and measure "
        "the whole model's perplexity on held-out text (Li et al. 2016). Writes sensitivity.json, .csv and "
        ".png; prints the layers ranked, most sensitive first. --allocation sensitivity --sensitivity "
        "OUT/sensitivity.json then turns the curves into per-layer sparsities."))
    p.add_argument("--method", default="wanda", help="any unstructured method (magnitude, wanda, sparsegpt, admm, "
                   "obd, taylor)")
    p.add_argument("--ratios", default="0.3,0.5,0.7,0.9", help="sparsities in (0, 1), rising")
    p.add_argument("--by", choices=["layers", "kinds"], default="layers",
                   help="one decoder layer at a time, or one kind of linear (q/k/v/o/gate/up/down) in every layer")
    p.add_argument("--layers", default=None, help="decoder layers to measure, e.g. 0,1,2 (default: all)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="true-sequential inside the pruned layer")
    p.add_argument("--eval", default="wikipedia-validation",
                   help="held-out perplexity text (default: the validation slice, so an allocation tuned on the "
                   "curves is not judged on the text it was tuned on)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length")
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows (0 = all)")
    _common(p)
    return p


def _saliency_parser() -> argparse.ArgumentParser:
    from llmprune.analysis.oracle import CRITERIA
    from llmprune.cli.common import Help

    p = argparse.ArgumentParser(prog="llmprune analyze saliency", formatter_class=Help, description=(
        "Rank structural units (attention heads, groups of MLP channels) of chosen layers by each saliency "
        "criterion and by the oracle, the exact change in calibration loss when the unit alone is removed "
        "(Molchanov et al. 2016); compare by Spearman correlation. Writes saliency.json, .csv, one PNG per "
        "layer and a bar chart of the correlations."))
    p.add_argument("--units", default="heads,channels", help="heads and/or channels")
    p.add_argument("--layers", default=None, help="decoder layers, e.g. 0,14,29 (default: first, middle, last)")
    p.add_argument("--channel-group", type=int, default=64, help="MLP channels per unit")
    p.add_argument("--criteria", default=",".join(CRITERIA), help="criteria to compare")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random criterion")
    p.add_argument("--oracle-samples", type=int, default=0,
                   help="the oracle's loss on the first N calibration sequences (0 = all; the criteria read all); "
                   "each unit costs one forward over them from its layer on")
    _common(p)
    return p


def _prepare(args: argparse.Namespace, sources: Sequence[str]) -> tuple[Any, Any, Any, Any]:
    """Early checks, then the model and the calibration ids."""
    from llmprune.cli.common import setup
    from llmprune.engine.driver import resolve_device
    from llmprune.engine.model import window_length
    from llmprune.io.data import calibration_data, check_text_source
    from llmprune.io.export import check_output
    from llmprune.io.loading import load

    setup(args)
    for source in sources:
        check_text_source(source)
    check_output(args.out, args.overwrite)  # before the work, not after it
    device = resolve_device(args.device)
    model, tokenizer = load(args.model, args.dtype)
    calibration = calibration_data(tokenizer, args.calib, args.nsamples, window_length(args.seqlen, model),
                                   args.seed)
    return model, tokenizer, calibration, device


def cmd_sensitivity(argv: Sequence[str]) -> int:
    from llmprune.analysis.report import sensitivity_files, sensitivity_table, write_folder
    from llmprune.analysis.sensitivity import SensitivityConfig, sensitivity
    from llmprune.cli.common import Bars, write_result
    from llmprune.engine.model import window_length
    from llmprune.io.data import evaluation_data

    args = _sensitivity_parser().parse_args(argv)
    config = SensitivityConfig(args.method, _numbers(args.ratios, "ratios"), args.by,
                               _numbers(args.layers, "layers", int) if args.layers else None, args.sequential)
    model, tokenizer, calibration, device = _prepare(args, [args.calib, args.eval])
    windows = evaluation_data(tokenizer, args.eval, window_length(args.eval_seqlen, model), args.eval_windows or None)
    result = sensitivity(model, config, calibration, windows, device=device, batch_size=args.batch_size,
                         progress=Bars(args.quiet))
    record = {"model": args.model, **result.to_dict(),
              "calibration": {"source": args.calib, "samples": args.nsamples, "seqlen": calibration.shape[1],
                              "seed": args.seed},
              "evaluation": {"source": args.eval, "windows": windows.shape[0], "seqlen": windows.shape[1]}}
    out = write_folder(args.out, args.overwrite, sensitivity_files(result, record))
    print(sensitivity_table(result))
    print(f"{len(result.curves)} {config.by} x {len(config.ratios)} ratios by {config.method} in "
          f"{result.seconds:.0f} s; wrote {out} (sensitivity.json, sensitivity.csv, sensitivity.png)")
    write_result(args, record)
    return 0


def cmd_saliency(argv: Sequence[str]) -> int:
    from llmprune.analysis.oracle import SaliencyConfig, saliency
    from llmprune.analysis.report import saliency_files, saliency_table, write_folder
    from llmprune.cli.common import Bars, write_result

    args = _saliency_parser().parse_args(argv)
    config = SaliencyConfig(tuple(u.strip() for u in args.units.split(",") if u.strip()),
                            _numbers(args.layers, "layers", int) if args.layers else None, args.channel_group,
                            tuple(c.strip() for c in args.criteria.split(",") if c.strip()), args.random_seed,
                            oracle_samples=args.oracle_samples or None)
    model, _, calibration, device = _prepare(args, [args.calib])
    result = saliency(model, config, calibration, device=device, batch_size=args.batch_size,
                      progress=Bars(args.quiet))
    record = {"model": args.model, **result.to_dict(),
              "calibration": {"source": args.calib, "samples": args.nsamples, "seqlen": calibration.shape[1],
                              "seed": args.seed}}
    files = saliency_files(result, record)
    out = write_folder(args.out, args.overwrite, files)
    print(saliency_table(result))
    print(f"best match to the oracle: {result.best() or 'none'} (mean Spearman over {len(result.studies)} studies); "
          f"{result.seconds:.0f} s; wrote {out} ({', '.join(sorted(files))})")
    write_result(args, record)
    return 0


def cmd_analyze(argv: Sequence[str]) -> int:
    argv = list(argv)
    kinds = {"sensitivity": cmd_sensitivity, "saliency": cmd_saliency}
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in kinds:
        raise LlmpruneError(f"unknown analysis {argv[0]!r}; use sensitivity or saliency")
    return kinds[argv[0]](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cmd_analyze(sys.argv[1:]))
