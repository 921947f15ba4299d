"""The analyses' files (JSON, CSV, PNG, written into one folder, published atomically) and
their printed tables. Plots are drawn on bare matplotlib Figures (no pyplot state)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from llmprune import __version__
from llmprune.analysis.oracle import SaliencyResult
from llmprune.analysis.sensitivity import SensitivityResult
from llmprune.io.export import OutputLock, check_output, publish, write_json

LABELLED = 3  # the most sensitive curves named on the plot


def write_folder(out: str | Path, overwrite: bool, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write ``files`` (name -> writer of that path) into a staging folder and publish it as
    ``out``, under ``out``'s lock; a manifest (llmprune.json) lists them, so ``--overwrite``
    may later replace the folder."""
    path = check_output(out, overwrite)

    def write(folder: Path) -> None:
        for name, writer in files.items():
            writer(folder / name)
        write_json(folder / "llmprune.json", {"llmprune_version": __version__, "kind": "analysis",
                                              "files": sorted(files)})

    with OutputLock(path):
        return publish(path, overwrite, write)


# --- sensitivity ---------------------------------------------------------------------------------


def sensitivity_files(result: SensitivityResult, record: dict[str, Any]) -> dict[str, Callable[[Path], None]]:
    return {"sensitivity.json": lambda p: write_json(p, record),
            "sensitivity.csv": lambda p: _sensitivity_csv(result, p),
            "sensitivity.png": lambda p: sensitivity_plot(result, p, record.get("model", ""))}


def _sensitivity_csv(result: SensitivityResult, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["unit", "ratio", "ppl", "log_ppl_increase"])
        writer.writerow(["dense", 0.0, f"{result.dense_ppl:.6f}", 0.0])
        for name, values in result.curves.items():
            for ratio, ppl, cost in zip(result.config.ratios, values, result.cost(name), strict=True):
                writer.writerow([name, ratio, f"{ppl:.6f}", f"{cost:.6f}"])


def sensitivity_plot(result: SensitivityResult, path: Path, model: str = "") -> None:
    """Perplexity against ratio, one line per layer (or kind), the most sensitive named."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    axes = figure.subplots()
    ratios = [0.0, *result.config.ratios]
    loud = set(result.ranking()[:LABELLED])
    count = max(1, len(result.curves) - 1)
    for number, (name, values) in enumerate(result.curves.items()):
        ys = [result.dense_ppl, *values]
        if name in loud:
            (line,) = axes.plot(ratios, ys, marker="o", linewidth=2, label=name)
            axes.annotate(name, (ratios[-1], ys[-1]), textcoords="offset points", xytext=(4, 0), fontsize=8,
                          color=line.get_color())
        else:
            axes.plot(ratios, ys, linewidth=1, alpha=0.6, color=_shade(number / count))
    axes.axhline(result.dense_ppl, color="gray", linestyle="--", label=f"dense {result.dense_ppl:.2f}")
    axes.set_yscale("log")
    axes.set_xlabel("sparsity of the pruned " + ("layer" if result.config.by == "layers" else "kind") +
                    f" ({result.config.method})")
    axes.set_ylabel("perplexity of the whole model (log scale)")
    axes.set_title(f"{model}: sensitivity by {result.config.by}; most sensitive named", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _shade(x: float) -> tuple[float, float, float]:
    """Early layers light blue, late ones dark blue."""
    return (0.55 - 0.45 * x, 0.7 - 0.45 * x, 0.95 - 0.35 * x)


def sensitivity_table(result: SensitivityResult) -> str:
    head = f"{'rank':>4}  {'unit':<12}" + "".join(f"{r:>10g}" for r in result.config.ratios) + f"{'mean Δlog':>11}"
    rows = [head, f"{'':>4}  {'dense':<12}" + f"{result.dense_ppl:>10.2f}" * len(result.config.ratios)]
    for rank, name in enumerate(result.ranking(), 1):
        cost = result.cost(name)
        rows.append(f"{rank:>4}  {name:<12}" + "".join(f"{p:>10.2f}" for p in result.curves[name]) +
                    f"{sum(cost) / len(cost):>11.3f}")
    return "\n".join(rows)


# --- saliency ------------------------------------------------------------------------------------


def saliency_files(result: SaliencyResult, record: dict[str, Any]) -> dict[str, Callable[[Path], None]]:
    files: dict[str, Callable[[Path], None]] = {
        "saliency.json": lambda p: write_json(p, record), "saliency.csv": lambda p: _saliency_csv(result, p),
        "saliency-spearman.png": lambda p: correlation_plot(result, p, record.get("model", ""))}
    for layer in sorted({s.layer for s in result.studies}):
        files[f"saliency-layer-{layer}.png"] = partial(oracle_plot, result, layer)
    return files


def _saliency_csv(result: SaliencyResult, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "unit", "index", "oracle", *result.config.criteria])
        for study in result.studies:
            for index, oracle in enumerate(study.oracle):
                writer.writerow([study.layer, study.unit, index, f"{oracle:.8g}",
                                 *(f"{study.scores[c][index]:.8g}" for c in result.config.criteria)])


def oracle_plot(result: SaliencyResult, layer: int, path: Path) -> None:
    """One row per unit kind, one panel per criterion: its score against the oracle."""
    from matplotlib.figure import Figure

    studies = [s for s in result.studies if s.layer == layer]
    criteria = result.config.criteria
    figure = Figure(figsize=(2.3 * len(criteria), 2.4 * len(studies)), dpi=100)
    grid = figure.subplots(len(studies), len(criteria), squeeze=False)
    for row, study in enumerate(studies):
        for column, criterion in enumerate(criteria):
            axes = grid[row][column]
            axes.scatter(study.oracle, study.scores[criterion], s=12)
            rho = study.spearman[criterion]
            axes.set_title(f"{criterion}: ρ {rho:.2f}" if not math.isnan(rho) else criterion, fontsize=9)
            axes.tick_params(labelsize=6)
            if column == 0:
                axes.set_ylabel(f"{study.unit}: score", fontsize=8)
            if row == len(studies) - 1:
                axes.set_xlabel("oracle Δloss", fontsize=8)
    figure.suptitle(f"decoder layer {layer}: criterion score against the exact loss change", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")


def correlation_plot(result: SaliencyResult, path: Path, model: str = "") -> None:
    """Spearman ρ of each criterion, one bar per study, grouped by criterion."""
    from matplotlib.figure import Figure

    criteria = result.config.criteria
    figure = Figure(figsize=(max(6, 1.2 * len(criteria)), 4), dpi=110)
    axes = figure.subplots()
    width = 0.8 / max(1, len(result.studies))
    for number, study in enumerate(result.studies):
        xs = [i + number * width for i in range(len(criteria))]
        ys = [0.0 if math.isnan(study.spearman[c]) else study.spearman[c] for c in criteria]
        axes.bar(xs, ys, width, label=f"layer {study.layer} {study.unit}")
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(criteria))], list(criteria), fontsize=8)
    axes.axhline(0, color="gray", linewidth=0.8)
    axes.set_ylim(-1, 1)
    axes.set_ylabel("Spearman ρ with the oracle")
    axes.set_title(f"{model}: which criterion ranks units like the exact loss change", fontsize=10)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, format="png")


def saliency_table(result: SaliencyResult) -> str:
    """Criteria as rows, one column per (layer, unit kind) study and their mean."""
    labels = [f"L{s.layer} {s.unit}" for s in result.studies]
    rows = [f"{'criterion':<11}" + "".join(f"{label:>14}" for label in labels) + f"{'mean':>8}"]
    means = result.mean_correlation()
    for criterion in sorted(result.config.criteria, key=lambda c: -_or(means[c])):
        cells = "".join(f"{_fmt(s.spearman[criterion]):>14}" for s in result.studies)
        rows.append(f"{criterion:<11}{cells}{_fmt(means[criterion]):>8}")
    return "\n".join(rows)


def _or(value: float) -> float:
    return -2.0 if value is None or math.isnan(value) else value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
