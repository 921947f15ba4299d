"""Every method and piece at every setting, on SmolLM2-135M, in one table.

Each row is one `llmprune` command (printed with the row, so it can be rerun alone), run in its
own process through the real CLI; its record gives the perplexity and the pruning time. Setup:
32 x 512 calibration tokens (seed 0) from pydoc and from the Wikipedia calibration split,
perplexity on the first 20 x 512 windows of the Wikipedia evaluation split, and on a validation
text when given (`--validation wikipedia-validation`, the built-in disjoint slice, or a file:
settings are chosen on it, never on the evaluation split).

    .venv/bin/python scripts/reproduce.py --threads 2 --json out/reproduce.json --plot out/reproduce.png
    .venv/bin/python scripts/reproduce.py --only default,admm --settings 50%,2:4 --calib pydoc

The table: one row per recipe and calibration text, one column per setting; each cell the
perplexity and, in brackets, the pruning seconds (plus the seconds sampling generated windows,
where the recipe has them); a last row gives the default's whole time over plain SparseGPT's.
The plot: perplexity against setting, one line per recipe (pydoc calibration). The reference
numbers are the best reference implementation per setting on the same protocol with pydoc
calibration (the issue's table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SETTINGS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"], "4:8": ["--pattern", "4:8"],
            "60%": ["--sparsity", "0.6"], "70%": ["--sparsity", "0.7"]}
CURVES = Path(__file__).resolve().parent.parent / "docs" / "results" / "sensitivity-smollm2-wanda.json"
REFERENCE = {"50%": 41.49, "2:4": 155.49, "4:8": 81.42, "60%": 140.55, "70%": 656.4}
# Recipe name -> extra flags. "default" names nothing: what `llmprune --sparsity S` does.
RECIPES: dict[str, list[str]] = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "sparsegpt+refit": ["--method", "sparsegpt", "--update", "admm"],
    "wanda+refit": ["--method", "wanda", "--update", "admm", "--set", "prune.admm_iterations=0", "--shrink", "0.7"],
    "ria": ["--method", "ria"],
    "ria+refit": ["--method", "ria", "--update", "admm", "--set", "prune.admm_iterations=0"],
    "admm": ["--method", "admm"],
    "wanda+admm": ["--method", "wanda", "--update", "admm"],
    "sparsegpt+dsnot": ["--method", "sparsegpt", "--refine", "dsnot"],
    "wanda+dsnot": ["--method", "wanda", "--refine", "dsnot"],
    "sparsegpt+owl": ["--method", "sparsegpt", "--allocation", "owl"],
    "default": [],
    # The default without its self-generated windows: all 32 from the calibration text.
    "default+real": ["--generated", "0"],
    "default+recover": ["--recover", "blockwise"],
    # The default without its refit's pull toward the dense model (README: "The refit toward the
    # dense model"), and with its calibration passes in float32 whatever the device.
    "default+notarget": ["--set", "prune.model_target=0"],
    "default+float32": ["--set", "prune.pass_dtype=float32"],
    "default+schedule": ["--recover", "blockwise", "--schedule", "SCHEDULE"],
    # Layer sparsities from the measured curves of `llmprune analyze sensitivity` (README: "With a
    # sensitivity analysis first"; they read Wikipedia text, beyond the pydoc rows' budget).
    "default+sensitivity": ["--allocation", "sensitivity", "--sensitivity", str(CURVES)],
}
UNSTRUCTURED_ONLY = {"sparsegpt+owl", "default+schedule", "default+sensitivity"}


def command(recipe: str, setting: str, calib: str, threads: int, record: Path) -> list[str]:
    target = SETTINGS[setting][1]  # schedule: half the target, then the target
    flags = [f"{float(target) / 2:g},{target}" if f == "SCHEDULE" else f for f in RECIPES[recipe]]
    return ["llmprune", "--model", "smollm2-135m", *SETTINGS[setting], *flags, "--calib", calib,
            "--nsamples", "32", "--seqlen", "512", "--seed", "0", "--eval", "wikipedia", "--eval-seqlen", "512",
            "--eval-windows", "20", "--device", "cpu", "--threads", str(threads), "--quiet", "--json", str(record)]


def run_row(recipe: str, setting: str, calib: str, threads: int, validation: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        record_path = Path(folder) / "record.json"
        cmd = command(recipe, setting, calib, threads, record_path)
        done = subprocess.run([sys.executable, "-m", "llmprune.cli", *cmd[1:]], capture_output=True, text=True,
                              check=False)
        row: dict[str, Any] = {"recipe": recipe, "setting": setting, "calib": calib, "command": shlex.join(cmd)}
        if done.returncode != 0 or not record_path.exists():
            row["error"] = (done.stderr.strip().splitlines() or ["failed"])[-1]
            return row
        record = json.loads(record_path.read_text())
    row.update(ppl=record["evaluation"]["ppl_pruned"], ppl_dense=record["evaluation"]["ppl_dense"],
               prune_s=record["timings"]["prune_s"], generate_s=record["timings"].get("generate_s", 0.0),
               sparsity=record["sparsity_achieved"],
               options=record["resolved_options"], method=record["method"])
    if validation:
        row["ppl_validation"] = validation_ppl(cmd, validation, threads)
    return row


def validation_ppl(cmd: list[str], text: str, threads: int) -> float | None:
    """The same command, evaluated on the validation text instead (its own run: the record holds
    one evaluation)."""
    with tempfile.TemporaryDirectory() as folder:
        record_path = Path(folder) / "record.json"
        swapped = [text if previous == "--eval" else part for previous, part in zip(["", *cmd], cmd, strict=True)]
        swapped[swapped.index("--json") + 1] = str(record_path)
        done = subprocess.run([sys.executable, "-m", "llmprune.cli", *swapped[1:]], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            return None
        return float(json.loads(record_path.read_text())["evaluation"]["ppl_pruned"])


def table(rows: list[dict[str, Any]], settings: list[str]) -> str:
    lines = ["| recipe | calibration | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    lines.append("| best reference | pydoc | " + " | ".join(f"{REFERENCE[s]:.2f}" for s in settings) + " |")
    keys = sorted({(r["recipe"], r["calib"]) for r in rows}, key=lambda k: (list(RECIPES).index(k[0]), k[1]))
    for recipe, calib in keys:
        cells = []
        for setting in settings:
            row = next((r for r in rows if (r["recipe"], r["calib"], r["setting"]) == (recipe, calib, setting)), None)
            if row is None:
                cells.append("")
            elif "error" in row:
                cells.append("failed")
            else:
                ratio = f", {row['ppl'] / REFERENCE[setting]:.2f}x" if calib == "pydoc" else ""
                cells.append(f"{row['ppl']:.2f} ({seconds(row)}{ratio})")
        lines.append(f"| {recipe} | {calib} | " + " | ".join(cells) + " |")
    # The default's whole time (pruning and sampling) against plain SparseGPT's, from this run.
    for calib in sorted({r["calib"] for r in rows}):
        ratios = [time_ratio(rows, calib, s) for s in settings]
        if any(ratios):
            lines.append(f"| default time / sparsegpt time | {calib} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def seconds(row: dict[str, Any]) -> str:
    """Pruning seconds, plus the sampling of generated windows where there was any."""
    made = f" + {row['generate_s']:.0f}" if row.get("generate_s") else ""
    return f"{row['prune_s']:.0f}{made} s"


def time_ratio(rows: list[dict[str, Any]], calib: str, setting: str) -> str:
    pick = {r["recipe"]: r for r in rows if r["calib"] == calib and r["setting"] == setting and "ppl" in r}
    if "default" not in pick or "sparsegpt" not in pick:
        return ""
    whole = pick["default"]["prune_s"] + pick["default"].get("generate_s", 0.0)
    return f"{whole / pick['sparsegpt']['prune_s']:.2f}x"


def plot(rows: list[dict[str, Any]], settings: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    positions = range(len(settings))
    axes.plot(positions, [REFERENCE[s] for s in settings], "k--", label="best reference")
    for recipe in RECIPES:
        points = [(i, r["ppl"]) for i, s in enumerate(settings) for r in rows
                  if r["recipe"] == recipe and r["setting"] == s and r["calib"] == "pydoc" and "ppl" in r]
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], "o-", label=recipe)
    axes.set_xticks(list(positions), settings)
    axes.set_yscale("log")
    axes.set_ylabel("perplexity (Wikipedia evaluation split, 20 x 512)")
    axes.set_title("SmolLM2-135M, pydoc calibration 32 x 512")
    axes.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma list of recipes (default: all)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list of settings")
    parser.add_argument("--calib", default="pydoc,wikipedia", help="comma list of calibration texts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validation", default=None,
                        help="also evaluate each row on this text (e.g. wikipedia-validation)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    recipes = args.only.split(",") if args.only else list(RECIPES)
    settings = args.settings.split(",")
    unknown = [r for r in recipes if r not in RECIPES] + [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"reproduce.py: unknown recipe or setting {unknown[0]!r}")
    rows: list[dict[str, Any]] = []
    # Setting by setting, the recipes back to back: on a machine whose speed drifts, the time
    # ratios compare runs made minutes apart, not a whole pass of the grid apart.
    for calib in args.calib.split(","):
        for setting in settings:
            for recipe in recipes:
                if recipe in UNSTRUCTURED_ONLY and ":" in setting:
                    continue
                row = run_row(recipe, setting, calib, args.threads, args.validation)
                rows.append(row)
                made = f" + {row['generate_s']:.0f} s generating" if row.get("generate_s") else ""
                shown = row.get("error") or f"ppl {row['ppl']:.2f}, {row['prune_s']:.0f} s{made}"
                print(f"{recipe:<17} {setting:<4} {calib:<9} {shown}   # {row['command']}", flush=True)
                if args.json:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print()
    print(table(rows, settings))
    if args.plot:
        plot(rows, settings, Path(args.plot))


if __name__ == "__main__":
    main()
