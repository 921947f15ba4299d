"""Layer sparsities from measured sensitivity curves (``allocation="sensitivity"``): the
``sensitivity.json`` of ``llmprune analyze sensitivity`` (by layers, every decoder layer), turned
into per-layer sparsities with the mean over all prunable weights exactly the target
(:func:`llmprune.core.allocation.sensitivity_sparsities`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from llmprune.core.allocation import sensitivity_sparsities
from llmprune.engine.experts import expert_containers, layout_of, slice_shapes
from llmprune.engine.model import find_linears, get_weight
from llmprune.errors import LlmpruneError
from llmprune.io.export import read_analysis


def read_curves(path: str, layers: int | None = None) -> dict[str, Any]:
    """The record of a sensitivity analysis by layers, checked (one line of error otherwise);
    ``layers``: the decoder layers it must cover (all of them, 0 to ``layers`` − 1)."""
    where, record = read_analysis(path, "sensitivity")
    if not (isinstance(record, dict) and record.get("kind") == "sensitivity"
            and isinstance(record.get("curves"), dict) and isinstance(record.get("ratios"), list)):
        raise LlmpruneError(f"{where} is not the sensitivity.json of `llmprune analyze sensitivity`")
    if (record.get("config") or {}).get("by") != "layers":
        raise LlmpruneError(f"{where} holds curves by kind of linear; the allocation needs them by layer "
                            "(`llmprune analyze sensitivity --by layers`)")
    measured = record.get("layers") or []
    ratios, curves, dense = record["ratios"], record["curves"], record.get("dense_ppl")
    if not _positive(dense) or not all(_positive(r) and r < 1 for r in ratios) or not all(
            isinstance(curves.get(f"layer {i}"), list) and len(curves[f"layer {i}"]) == len(ratios)
            and all(_positive(p) for p in curves[f"layer {i}"]) for i in measured):
        raise LlmpruneError(f"{where} holds curves that are not finite positive perplexities at ratios in (0, 1), "
                            "one per ratio for every measured layer")
    if layers is not None and sorted(measured) != list(range(layers)):
        raise LlmpruneError(f"{where} measured decoder layers {_span(measured)}, and this model has {layers} "
                            f"(0 to {layers - 1}): measure every layer of this model")
    return record


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _span(values: list[int]) -> str:
    return f"{min(values)} to {max(values)} ({len(values)})" if values else "none"


def prunable_size(layer: nn.Module) -> int:
    """The weights a method may prune in one decoder layer: its linears and its fused experts'
    matrices (shapes only: a streamed layer's meta tensors will do)."""
    total = sum(get_weight(linear).numel() for linear in find_linears(layer).values())
    for module in expert_containers(layer).values():
        layout = layout_of(module)
        assert layout is not None
        total += layout.experts * sum(math.prod(shape) for shape in slice_shapes(layout).values())
    return total


def curve_allocation(path: str, layers: nn.ModuleList, target: float) -> dict[str, Any]:
    """The allocation record: per-layer sparsities from the curves at ``path``."""
    record = read_curves(path, len(layers))
    dense = float(record["dense_ppl"])
    by_layer = {int(i): f"layer {i}" for i in record["layers"]}
    costs = [[math.log(float(p) / dense) for p in record["curves"][by_layer[i]]] for i in range(len(layers))]
    sizes = [prunable_size(layer) for layer in layers]
    sparsity = sensitivity_sparsities([float(r) for r in record["ratios"]], costs, sizes, target)
    # The file's name only: a model card may be published, the server's folders are nobody's business.
    return {"kind": "sensitivity", "source": Path(path).name, "method": record["config"]["method"],
            "ratios": record["ratios"], "sparsity": sparsity}
