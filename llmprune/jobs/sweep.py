"""A grid of pruning runs on one model: methods × (unstructured sparsities + N:M patterns).

The model is loaded and the calibration inputs of layer 0 are captured once; before each run the
decoder layers get their dense weights back from a copy kept in memory (and the network-loss gradients
of obd and taylor, the dense model's, are computed once for every point). Results go to
``sweep.json`` and ``sweep.csv`` after every run (so an interrupted sweep resumes where it
stopped: finished points are skipped when their setup matches) and to a PNG plot of perplexity
against sparsity, one line per method, N:M patterns as points.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmprune.core.patterns import Pattern
from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.engine.model import window_length
from llmprune.errors import LlmpruneError
from llmprune.eval.perplexity import perplexity
from llmprune.io.export import OutputLock, write_json
from llmprune.jobs.pipeline import evaluate_ppl
from llmprune.jobs.spec import EvalConfig
from llmprune.progress import Event, Progress, check_cancel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7)
    patterns: tuple[str, ...] = ("2:4", "4:8")
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=32, seqlen=512))
    evaluation: EvalConfig = field(default_factory=lambda: EvalConfig(seqlen=512, windows=20))
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.methods:
            raise LlmpruneError("a sweep needs at least one method")
        if not self.evaluation.source:
            raise LlmpruneError("a sweep compares perplexities; give an --eval text")
        for point in self.points():  # every combination is validated before any work
            point.options()

    def points(self) -> list[PruneConfig]:
        configs = []
        for method in self.methods:
            configs += [PruneConfig(method, "unstructured", s) for s in self.sparsities]
            configs += [PruneConfig(method, p, None) for p in self.patterns if Pattern.parse(p).kind == "nm"]
        return configs

    def setup(self) -> dict[str, Any]:
        """What must match for finished points to be reused."""
        calibration = asdict(self.calibration)
        if not calibration["generated"]:  # sweeps from before the key existed match one without it
            del calibration["generated"]
        return {"model": self.model, "calibration": calibration, "evaluation": asdict(self.evaluation),
                "dtype": self.dtype, "batch_size": self.batch_size}


def point_key(config: PruneConfig) -> str:
    return f"{config.method} {config.pattern} {config.target_sparsity:g}"


def _load_existing(path: Path, setup: dict[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        return {"setup": setup, "dense_ppl": None, "points": []}
    try:
        data = json.loads(path.read_text())
        stored = data["setup"]
    except (ValueError, KeyError) as exc:
        raise LlmpruneError(f"{path} is not a sweep record ({exc}); choose another --out") from None
    if stored != setup:
        changed = sorted(k for k in set(stored) | set(setup) if stored.get(k) != setup.get(k))
        raise LlmpruneError(f"{path} holds a sweep with another setup ({', '.join(changed)} differ); "
                            "choose another --out")
    return dict(data)


def run_sweep(config: SweepConfig, out: str | Path, progress: Progress | None = None,
              cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run every point not yet in ``out/sweep.json``; returns the sweep record. ``out`` is
    locked while the sweep runs (a second sweep on it is refused), and made only when needed."""

    folder = Path(out).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise LlmpruneError(f"sweep output {folder} exists and is not a folder")
    created = not folder.exists()
    with OutputLock(folder):
        try:
            return _sweep(config, folder, progress, cancel)
        except BaseException:
            if created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # failed before it wrote anything: leave no empty folder behind
            raise


def _sweep(config: SweepConfig, folder: Path, progress: Progress | None,
           cancel: Callable[[], bool] | None) -> dict[str, Any]:
    from llmprune.engine.capture import capture_layer_calls
    from llmprune.engine.driver import auto_batch_size, prune, resolve_device
    from llmprune.engine.gradients import loss_gradients
    from llmprune.engine.model import find_decoder_layers, find_linears, get_weight
    from llmprune.engine.saliency import check_gradients_possible
    from llmprune.io.data import calibration_data, evaluation_data
    from llmprune.io.loading import load
    from llmprune.methods import PER_WEIGHT, get_method, pieces

    record_path = folder / "sweep.json"
    record = _load_existing(record_path, config.setup())
    done = {p["key"] for p in record["points"]}
    todo = [p for p in config.points() if point_key(p) not in done]
    device = resolve_device(config.device)
    tick = time.perf_counter()
    model, tokenizer = load(config.model, config.dtype)
    folder.mkdir(parents=True, exist_ok=True)
    cal = config.calibration
    calibration = calibration_data(tokenizer, cal.source, cal.samples, window_length(cal.seqlen, model), cal.seed)
    if cal.generated:  # every point names its method: windows are generated only when asked for
        from llmprune.io.generated import generated_windows

        calibration = generated_windows(model, tokenizer, calibration, cal.generated, cal.seed, device, progress)
    if record["dense_ppl"] is None:
        record["dense_ppl"] = evaluate_ppl(model, tokenizer, config.evaluation, device)["ppl"]
        write_json(record_path, record)
    if todo:
        _, layers = find_decoder_layers(model)
        dense = {k: v.clone() for k, v in layers.state_dict().items()}
        widest = max(max(get_weight(lin).shape) for lin in find_linears(layers[0]).values())
        size = config.batch_size or auto_batch_size(calibration.shape[0], calibration.shape[1], widest, device)
        captured = capture_layer_calls(model, layers, list(calibration.split(size)))
        # The network-loss gradients (obd, taylor) are the dense model's: computed once for every point.
        gradients = None
        needs = {p.method_name: pieces.needs(get_method(p.method_name), p.options()) for p in todo}
        for name, kinds in needs.items():  # refused before the backward pass, not after it
            check_gradients_possible(get_method(name), kinds, layers, streamed=False)
        if any(kinds & PER_WEIGHT for kinds in needs.values()):
            gradients = loss_gradients(model, calibration, device, cancel=cancel)
        seqlen = window_length(config.evaluation.seqlen, model)
        windows = evaluation_data(tokenizer, config.evaluation.source or "", seqlen, config.evaluation.windows or None)
        for number, point in enumerate(todo):
            check_cancel(cancel, f"sweep after {number} of {len(todo)} new points")
            if progress is not None:  # the stage is the point about to run
                progress(Event(point_key(point), number, len(todo), "points"))
            layers.load_state_dict(dense)
            report = prune(model, point, calibration, device=device, batch_size=size, captured=captured,
                           gradients=gradients)
            home = next(model.parameters()).device
            model.to(device)
            try:
                ppl = perplexity(model, windows, batch_size=config.evaluation.batch_size)
            finally:
                model.to(home)
            record["points"].append({"key": point_key(point), "method": point.method, "pattern": point.pattern,
                                     "sparsity_target": point.target_sparsity, "sparsity_achieved": report.sparsity,
                                     "ppl": ppl, "prune_s": report.seconds})
            save(record, folder)
        layers.load_state_dict(dense)
    record["seconds_this_run"] = time.perf_counter() - tick
    save(record, folder)
    return record


def save(record: dict[str, Any], folder: Path) -> None:
    """sweep.json, sweep.csv and sweep.png, each replaced atomically."""
    write_json(folder / "sweep.json", record)
    partial = folder / ".sweep.csv.partial"
    with open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "pattern", "sparsity_target", "sparsity_achieved", "ppl", "prune_s"])
        writer.writerow(["dense", "", 0.0, 0.0, record["dense_ppl"], ""])
        for p in record["points"]:
            writer.writerow([p["method"], p["pattern"], p["sparsity_target"], f"{p['sparsity_achieved']:.6f}",
                             f"{p['ppl']:.6f}", f"{p['prune_s']:.2f}"])
    partial.replace(folder / "sweep.csv")
    plot(record, folder / "sweep.png")


def series(record: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """The plotted series: one per method (unstructured) and one per method and N:M pattern."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for p in record["points"]:
        name = p["method"] if p["pattern"] == "unstructured" else f"{p['method']} {p['pattern']}"
        lines.setdefault(name, []).append((p["sparsity_target"], p["ppl"]))
    return {name: sorted(values) for name, values in sorted(lines.items())}


def plot(record: dict[str, Any], path: Path) -> dict[str, list[tuple[float, float]]]:
    """Perplexity against sparsity (log scale); the series names go into the PNG's metadata.
    Drawn on a bare Figure (no pyplot state, no backend switched for the host process)."""
    from matplotlib.figure import Figure

    lines = series(record)
    figure = Figure(figsize=(7, 4.5), dpi=110)
    axes = figure.subplots()
    markers = iter("os^Dv<>ph*")
    colors: dict[str, Any] = {}
    for name, values in lines.items():
        method = name.split()[0]
        xs, ys = zip(*values, strict=True)
        if " " in name:  # N:M: points in the method's colour
            axes.plot(xs, ys, linestyle="none", marker=next(markers, "o"), markersize=8, label=name,
                      color=colors.get(method))
        else:
            (line,) = axes.plot(xs, ys, marker="o", label=name)
            colors[method] = line.get_color()
    if record.get("dense_ppl"):
        axes.axhline(record["dense_ppl"], color="gray", linestyle="--", label=f"dense {record['dense_ppl']:.2f}")
    axes.set_yscale("log")
    axes.set_xlabel("sparsity of the pruned linears (fraction of zeros)")
    axes.set_ylabel("perplexity (log scale)")
    setup = record["setup"]
    axes.set_title(f"{setup['model']}: perplexity vs sparsity ({setup['evaluation']['source']} eval)", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", metadata={"Description": json.dumps(lines)})
    partial.replace(path)
    return lines


def table(record: dict[str, Any]) -> str:
    rows = [f"{'method':<11}{'pattern':<14}{'sparsity':>9}{'ppl':>12}{'prune s':>9}",
            f"{'dense':<11}{'':<14}{0:>9.2f}{record['dense_ppl']:>12.3f}"]
    for p in record["points"]:
        rows.append(f"{p['method']:<11}{p['pattern']:<14}{p['sparsity_achieved']:>9.3f}{p['ppl']:>12.3f}"
                    f"{p['prune_s']:>9.1f}")
    return "\n".join(rows)

