"""Generic model adapter: find the decoder layers and their linear layers without per-family
tables, and read/write weights in the (out, in) orientation of ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from llmprune.engine.experts import expert_containers, expert_count
from llmprune.errors import LlmpruneError
from llmprune.progress import Cancel, check_cancel

try:  # GPT-2 style models store linears as Conv1D with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers, and its dotted name.

    Candidates are ModuleLists whose entries all share one class and contain a linear layer; a
    list inside another candidate's blocks (the experts of a mixture-of-experts layer) is never
    one. Among the rest, a list of the class named in ``model._no_split_modules`` (the unit
    transformers itself never splits across devices) wins, then the longest.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(block) for block in module}
        if len(kinds) == 1 and find_linears(module[0]):
            candidates.append((name, module))
    outer = [(name, module) for name, module in candidates
             if not any(other and name.startswith(other + ".") for other, _ in candidates)]
    if not outer:
        raise LlmpruneError(
            f"{type(model).__name__} has no stack of decoder layers (no ModuleList of identical "
            "blocks containing linear layers); llmprune prunes decoder-only transformers"
        )
    name, layers = max(outer, key=lambda item: (type(item[1][0]).__name__ in no_split, len(item[1])))
    return name, layers


def _expert_siblings(block: nn.Module) -> dict[str, set[int]]:
    """For each module that holds a fused expert container (a child with a 3-D parameter, one
    slice per expert, or a container unfused for pruning), the expert counts: {parent name: {E}}."""
    found: dict[str, set[int]] = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):  # a convolution's kernel is 3-D, not experts
            continue
        count = expert_count(module)
        if count is not None:
            found.setdefault(name.rpartition(".")[0], set()).add(count)
        for param in module.parameters(recurse=False):
            if param.ndim >= 3:
                found.setdefault(name.rpartition(".")[0], set()).add(int(param.shape[0]))
    return found


def routers(block: nn.Module) -> dict[str, nn.Module]:
    """The routing modules of mixture-of-experts layers inside ``block``: a sibling of an expert
    container whose weight has one row per expert (the router logits) or a single row (a
    shared expert's gate). They decide which weights run and are never pruned."""
    experts = _expert_siblings(block)
    found = {}
    for name, module in block.named_modules():
        parent = name.rpartition(".")[0]
        weight = getattr(module, "weight", None)
        if parent in experts and isinstance(weight, torch.Tensor) and weight.ndim == 2 and (
                weight.shape[0] == 1 or int(weight.shape[0]) in experts[parent]):
            found[name] = module
    return found


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All linear layers (``nn.Linear`` or transformers' ``Conv1D``) inside ``block``, by name,
    mixture-of-experts routers excepted."""
    linears: dict[str, nn.Module] = {name: module for name, module in block.named_modules()
               if isinstance(module, (nn.Linear, Conv1D)) and name}
    if linears and _expert_siblings(block):
        for name in routers(block):
            linears.pop(name, None)
    return linears


def weight_matrices(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight matrix inside ``block`` (parameters of two or more dimensions, the stacked
    per-expert biases of fused experts excepted), by name: what "the sparsity of the decoder
    layers" is counted over."""
    return {name: p for name, p in block.named_parameters() if p.ndim >= 2 and not name.endswith("bias")}


def unprunable_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    """Weight matrices of ``block`` that are neither a linear's weight, nor a router's, nor a
    fused expert weight llmprune can unfuse (:mod:`llmprune.engine.experts`): what no method
    can prune."""
    covered = {id(lin.weight) for lin in find_linears(block).values()}
    covered |= {id(p) for r in routers(block).values() for p in r.parameters(recurse=False)}
    covered |= {id(p) for c in expert_containers(block).values() for p in c.parameters(recurse=False)}
    return {name: p for name, p in weight_matrices(block).items() if id(p) not in covered}


def count_zeros(block: nn.Module) -> tuple[int, int]:
    """(exact zeros, elements) over the weight matrices of ``block``."""
    zeros = total = 0
    for param in weight_matrices(block).values():
        total += param.numel()
        zeros += param.numel() - int(torch.count_nonzero(param))
    return zeros, total


def floating_dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every floating parameter and buffer of ``module``, by name."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.dtype for name, t in tensors if t is not None and t.is_floating_point()}


@torch.no_grad()
def restore_dtypes(module: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast each tensor back to its dtype in ``dtypes`` (from :func:`floating_dtypes`): a layer
    computed in float32 returns to its own precisions, so tensors a model keeps in float32
    beside bfloat16 weights (DeepSeek's router, gpt-oss norms) are never rounded."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        want = dtypes.get(name)
        if tensor is not None and want is not None and tensor.dtype != want:
            tensor.data = tensor.data.to(want)


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
        if id(param) in skipped or param.device.type == "meta":  # meta: not read yet (a streamed head)
            continue
        if not is_finite(param.detach()):
            raise LlmpruneError(f"weight {name} contains NaN or Inf; the checkpoint is damaged")


# Elements summed at a time: a sum over a whole fp16 tensor in fp32 first makes an fp32 copy
# of it (400 MB for a 49152 x 2048 embedding), which set a streamed run's peak memory.
FINITE_CHUNK = 1 << 22


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. A sum is NaN/Inf whenever an element is (and rarely
    otherwise: overflow), without allocating a mask the size of the weight; only a suspicious
    chunk is checked element by element."""
    for chunk in tensor.reshape(-1).split(FINITE_CHUNK):
        if not torch.isfinite(chunk.sum(dtype=torch.float32)) and not torch.isfinite(chunk).all():
            return False
    return True


def model_max_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config admits, if it says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def window_length(requested: int | None, model: nn.Module) -> int:
    """A calibration or evaluation window length: ``requested``, or min(2048, the model's limit);
    longer than the limit is an error."""
    limit = model_max_length(model)
    default = min(2048, limit) if limit else 2048
    if requested is not None and limit is not None and requested > limit:
        raise LlmpruneError(f"seqlen {requested} exceeds the model's limit of {limit} tokens")
    if requested is not None and requested < 2:
        raise LlmpruneError(f"seqlen must be >= 2, got {requested}")
    return requested or default


def eager_attention_width(model: nn.Module, seqlen: int) -> int:
    """Elements per token that an eager attention keeps alive while a batch waits in lockstep
    (its heads × seqlen probabilities; the SDPA and flash kernels keep none)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "eager":
        return 0
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "num_attention_heads", 0) or 0) * seqlen


@contextlib.contextmanager
def polled(model: nn.Module, cancel: Cancel | None, where: str) -> Iterator[None]:
    """Poll ``cancel`` before every forward pass of ``model`` while the block runs: work driven
    by another library (lm-eval, ``generate``) stops at its next forward with :class:`Cancelled`."""
    if cancel is None:
        yield
        return

    def hook(module: nn.Module, args: Any) -> None:
        check_cancel(cancel, where)

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
