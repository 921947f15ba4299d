"""Generic model adapter: find the decoder layers and their linear layers without per-family
tables, and read/write weights in the (out, in) orientation of ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.errors import LlmpruneError

try:  # GPT-2 style models store linears as Conv1D with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers, and its dotted name.

    Prefers a list whose blocks are of a class named in ``model._no_split_modules`` (the unit
    transformers itself never splits across devices); otherwise the longest ModuleList whose
    entries all share one class and contain a linear layer.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(block) for block in module}
        if len(kinds) != 1 or not find_linears(module[0]):
            continue
        preferred = int(type(module[0]).__name__ in no_split)
        candidate = (preferred, len(module), name, module)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        raise LlmpruneError(
            f"{type(model).__name__} has no stack of decoder layers (no ModuleList of identical "
            "blocks containing linear layers); llmprune prunes decoder-only transformers"
        )
    return best[2], best[3]


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All linear layers (``nn.Linear`` or transformers' ``Conv1D``) inside ``block``, by name."""
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name
    }


def get_weight(linear: nn.Module) -> torch.Tensor:
    """The weight as (out, in), a view of the module's parameter."""
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight.T if isinstance(linear, Conv1D) else weight


@torch.no_grad()
def set_weight(linear: nn.Module, W: torch.Tensor) -> None:
    """Write an (out, in) weight back, cast to the parameter's dtype: the single place where
    fp32 solver results return to the model's precision."""
    target = get_weight(linear)
    target.copy_(W.to(device=target.device, dtype=target.dtype))


def check_finite(module: nn.Module, prefix: str = "", skip: nn.Module | None = None) -> None:
    """Refuse weights with NaN or Inf: statistics and solves would silently propagate them.
    Parameters of ``skip`` are left out (the driver checks each decoder layer when it gets to it,
    so the checkpoint's pages are not all read in, and kept resident, before pruning starts)."""
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    for name, param in module.named_parameters(prefix=prefix.rstrip(".")):
        if id(param) in skipped:
            continue
        # A sum is NaN/Inf whenever an element is (and rarely otherwise: overflow), without
        # allocating a mask the size of the weight; only a suspicious sum is checked exactly.
        if not torch.isfinite(param.sum(dtype=torch.float32)) and not torch.isfinite(param).all():
            raise LlmpruneError(f"weight {name} contains NaN or Inf; the checkpoint is damaged")


def model_max_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config admits, if it says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
