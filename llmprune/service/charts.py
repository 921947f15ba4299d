"""Small SVG charts for the dashboard, drawn on the server: no JavaScript, no CDN, readable in
any browser and in a saved page."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from html import escape
from typing import Any

WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 16, 44
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    lines: bool = True  # False: markers only (N:M runs are points, not a curve)


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    log_y: bool = True
    reference: tuple[str, float] | None = None  # a labelled horizontal line (the dense perplexity)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def render(chart: Chart) -> str:
    """The chart as an SVG element (a figure of its own, with a title and a text fallback)."""
    def drawable(y: float) -> bool:
        return math.isfinite(y) and (y > 0 or not chart.log_y)

    values = [(x, y) for s in chart.series for x, y in s.points if math.isfinite(x) and drawable(y)]
    reference = chart.reference if chart.reference is not None and drawable(chart.reference[1]) else None
    if reference is not None:
        values.append((values[0][0] if values else 0.0, reference[1]))
    if not values:
        return f'<p class="empty">{escape(chart.title)}: nothing to draw yet.</p>'

    def ty(y: float) -> float:
        return math.log10(y) if chart.log_y else y

    xs, ys = [x for x, _ in values], [ty(y) for _, y in values]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (ty(y) - y0) / (y1 - y0)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(chart.title)}" class="chart">', f"<title>{escape(chart.title)}</title>",
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for x in _ticks(x0, x1):
        parts.append(f'<text x="{px(x):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" '
                     f'font-size="11">{x:.3g}</text>')
    for y in _ticks(y0, y1):
        label = 10 ** y if chart.log_y else y
        parts.append(f'<text x="{LEFT - 6}" y="{TOP + (1 - (y - y0) / (y1 - y0)) * plot_h + 4:.1f}" '
                     f'text-anchor="end" font-size="11">{label:.3g}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle" font-size="12">'
                 f"{escape(chart.x_label)}</text>")
    parts.append(f'<text x="14" y="{TOP + plot_h / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {TOP + plot_h / 2})">{escape(chart.y_label)}</text>')
    if reference is not None:
        name, value = reference
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(value):.1f}" y2="{py(value):.1f}" '
                     f'stroke="#555" stroke-dasharray="4 3"><title>{escape(name)} {value:.4g}</title></line>')
    for index, series in enumerate(chart.series):
        colour = COLOURS[index % len(COLOURS)]
        points = sorted(p for p in series.points if math.isfinite(p[0]) and drawable(p[1]))
        if series.lines and len(points) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y in points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}">'
                         f"<title>{escape(series.name)}: {x:.4g}, {y:.4g}</title></circle>")
        legend_y = TOP + 14 + index * 16
        parts.append(f'<circle cx="{WIDTH - RIGHT + 14}" cy="{legend_y - 4}" r="4" fill="{colour}"/>'
                     f'<text x="{WIDTH - RIGHT + 24}" y="{legend_y}" font-size="11">{escape(series.name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def layer_errors(layers: list[dict[str, Any]]) -> Chart:
    """Per-linear reconstruction error by decoder layer, one series per kind of linear (an MoE
    layer's experts averaged per kind)."""
    grouped: dict[str, dict[int, list[float]]] = {}
    for entry in layers:
        error, name = entry.get("error"), str(entry.get("name", ""))
        found = re.search(r"\.(\d+)\.", name)
        if error is None or found is None:
            continue
        kind = re.sub(r"\.\d+\.", ".", name[found.end():])
        grouped.setdefault(kind, {}).setdefault(int(found.group(1)), []).append(float(error))
    series = [Series(kind, [(layer, sum(v) / len(v)) for layer, v in sorted(by_layer.items())])
              for kind, by_layer in sorted(grouped.items())]
    return Chart("Reconstruction error of each pruned linear, by decoder layer", "decoder layer",
                 "relative reconstruction error", series)


def perplexity_against_sparsity(jobs: list[dict[str, Any]], dense: float | None) -> Chart:
    """The sweep plot from finished jobs: one line per method over unstructured sparsities,
    N:M and structured runs as points of their own series."""
    by_series: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for job in jobs:
        achieved, ppl = job.get("achieved"), job.get("ppl_pruned")
        if achieved is None or ppl is None:
            continue
        pattern = job.get("pattern") or "unstructured"
        line = pattern == "unstructured"
        name = str(job.get("method")) if line else f"{job.get('method')} {pattern}"
        by_series.setdefault((name, line), []).append((float(achieved), float(ppl)))
    series = [Series(name, points, lines=line) for (name, line), points in sorted(by_series.items())]
    return Chart("Perplexity against sparsity", "sparsity achieved", "perplexity (held-out text)", series,
                 reference=("dense", dense) if dense is not None else None)
