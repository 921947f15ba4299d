"""Mask-preserving block-wise recovery: after a decoder layer is pruned, its kept weights are
trained so the pruned layer, on the inputs the pruning saw (already passed through the pruned
earlier layers), reproduces the dense targets, as in EBFT (Guo et al. 2024) and Wanda++'s
regional optimisation (Yang et al. 2025).

The targets (:func:`dense_targets`) are the dense layer's outputs on the dense model's own
activations (``recover_target="model"``, the default: the driver carries them beside the pruned
ones), so the layer learns to undo the error it receives as well as its own; or, with
``"layer"``, the dense layer's outputs on the pruned inputs (its own error only). Two stages,
each with Adam over the calibration batches:

1. the attention block's linears, to match the dense attention block's output (the forward
   stops right after it: the MLP is not run);
2. the remaining linears (the MLP), to match the dense layer's output, with the recovered
   attention in place. The MLP acts on each token alone and the layer adds its output to a
   residual the MLP's weights do not change (both checked on the first batch:
   :func:`mlp_regression`), so its inputs and what it must add are computed once and the stage
   trains the MLP alone on tokens shuffled across all training batches (a fixed seed),
   ``mlp_steps`` mini-batches per calibration batch: steps on tokens drawn from every sequence
   instead of one sequence's correlated run, and no attention forward per step. A layer that
   fails the checks (post-norm; an MLP mixing tokens) or whose MLP is not found by name trains
   the whole layer, a step per calibration batch, as the attention stage does (and as
   ``mlp_steps=0`` asks everywhere).

Two options, off by default (README, "Recovery settings": together, on validation, level with
the default at 50% on the mean of both calibration texts and 3.9% worse at 60%):
``schedule="cosine"`` takes the step from ``lr`` down to zero over each stage's steps, and
``keep="best"`` measures the layer's output error on the held-out batch after every epoch of
each stage and ends the stage on its best epoch's weights (its starting weights when no epoch
beat them).

Pruned weights stay exactly zero: every gradient is masked and every weight re-masked after
each step, so N:M groups stay valid too. The layer is trained in float32 whatever its storage
dtype, and its weights are rounded back afterwards. The last calibration batch is held out: the
recovery is kept only if it lowers the layer's relative output error ‖y − y_dense‖²/‖y_dense‖²
on it; otherwise the pruned weights are restored. With a single batch there is nothing to hold
out and the check runs on that batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmprune.engine.capture import LayerCall, StopForward
from llmprune.engine.model import find_linears, floating_dtypes, restore_dtypes
from llmprune.io.memory import available_bytes

ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe")
SHUFFLE_SEED = 0  # the token order is fixed, so a resumed or streamed run trains the same way


@dataclass(frozen=True)
class RecoverSettings:
    epochs: int
    lr: float  # the step ("cosine": the first one, falling to zero over the stage)
    schedule: str  # "constant" or "cosine"
    keep: str  # "last": each stage ends on its last epoch; "best": on its best by the held-out error
    mlp_steps: int = 2  # the MLP stage's steps per calibration batch, on shuffled tokens


def step_size(settings: RecoverSettings, step: int, total: int) -> float:
    """The learning rate of ``step`` (0-based) of a stage of ``total`` steps."""
    if settings.schedule == "constant":
        return settings.lr
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def attention_block(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The layer's attention submodule (by the names transformers uses), if it has one."""
    for name, child in layer.named_children():
        if name in ATTENTION_NAMES:
            return name, child
    return None


class _Catch:
    """A forward hook that keeps a module's output and, with ``stop``, ends the forward there."""

    def __init__(self, stop: bool) -> None:
        self.stop, self.output = stop, None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output
        if self.stop:
            raise StopForward


@contextmanager
def _hooked(module: nn.Module, catch: _Catch) -> Iterator[_Catch]:
    handle = module.register_forward_hook(catch)
    try:
        yield catch
    finally:
        handle.remove()


def _forward(layer: nn.Module, attention: nn.Module | None, call: LayerCall, state: torch.Tensor,
             device: torch.device, upto_attention: bool) -> torch.Tensor:
    if not upto_attention:
        return call.run(layer, state, device).float()
    assert attention is not None
    with _hooked(attention, _Catch(stop=True)) as catch:
        try:
            call.run(layer, state, device)
        except StopForward:
            pass
    assert catch.output is not None
    return catch.output.float()


@torch.no_grad()
def dense_targets(layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall],
                  device: torch.device) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
    """The dense layer's attention outputs (None without an attention block) and outputs on
    ``hidden`` (the dense model's activations, or the pruned model's), per batch, on the CPU in
    float32."""
    found = attention_block(layer)
    attention_out: list[torch.Tensor] | None = [] if found else None
    outputs = []
    for state, call in zip(hidden, calls, strict=True):
        catch = _Catch(stop=False)
        if found:
            with _hooked(found[1], catch):
                out = call.run(layer, state.to(device), device)
            assert attention_out is not None and catch.output is not None
            attention_out.append(catch.output.detach().float().to("cpu"))
        else:
            out = call.run(layer, state.to(device), device)
        outputs.append(out.detach().float().to("cpu"))
    return attention_out, outputs


def _relative_error(layer: nn.Module, state: torch.Tensor, call: LayerCall, target: torch.Tensor,
                    device: torch.device) -> float:
    with torch.no_grad():
        out = call.run(layer, state.to(device), device).float()
        reference = target.to(device)
        return float((out - reference).square().sum() / reference.square().sum().clamp_min(1e-30))


def _parameter(linear: nn.Module) -> torch.Tensor:
    """A linear's weight parameter as it is stored (Conv1D: (in, out))."""
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def mlp_block(layer: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    """The layer's MLP submodule (by the names transformers uses), if it holds every one of the
    linears ``names`` the MLP stage trains."""
    for name, child in layer.named_children():
        if name in MLP_NAMES and names and all(n.startswith(name + ".") for n in names):
            return name, child
    return None


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _MlpTap:
    """A forward hook on the MLP: keeps its input, its output and the output as returned (a
    mixture of experts may return its router's logits beside it)."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.returned: Any = None

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self.input = _only_tensor(args, kwargs)
        self.output, self.returned = _first(output), output


def _only_tensor(args: Any, kwargs: Any) -> torch.Tensor | None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    extra = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 and not extra else None


class _Silenced:
    """Stands in for the MLP's forward: keeps its input and returns zeros where the output was
    (``returned``: the real return on a batch of the same shape, whose other parts, a router's
    logits, are passed on as they were), so the layer's output is what the MLP adds to. The MLP
    is not run: this pass costs the attention block alone."""

    def __init__(self, returned: Any, shape: torch.Size) -> None:
        self.returned, self.shape = returned, shape
        self.input: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.input = _only_tensor(args, kwargs)
        if self.input is None or self.input.shape != self.shape:
            raise StopForward  # not the one-tensor call of the first batch: no regression
        zero = torch.zeros_like(_first(self.returned))
        return (zero, *self.returned[1:]) if isinstance(self.returned, (tuple, list)) else zero


def _tapped(layer: nn.Module, mlp: nn.Module, call: LayerCall, state: torch.Tensor,
            device: torch.device) -> tuple[torch.Tensor, _MlpTap]:
    tap = _MlpTap()
    handle = mlp.register_forward_hook(tap, with_kwargs=True)
    try:  # a float32 state: the output is not rounded to a half-precision model's own dtype
        out = call.run(layer, state.float(), device).float()
    finally:
        handle.remove()
    return out, tap


def _silenced(layer: nn.Module, mlp: nn.Module, call: LayerCall, state: torch.Tensor, device: torch.device,
              stand_in: _Silenced) -> torch.Tensor | None:
    """The layer's output with the MLP's output zero (None when the MLP is not called as on
    the first batch)."""
    own = mlp.__dict__.get("forward")  # a wrapper of accelerate's hooks, put back afterwards
    stand_in.input = None  # a batch that does not call the MLP must not reuse the last one's input
    mlp.forward = stand_in
    try:
        return call.run(layer, state.float(), device).float()
    except StopForward:
        return None
    finally:
        if own is None:
            del mlp.forward
        else:
            mlp.forward = own


def _close(found: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> bool:
    """``found`` equals a nonzero ``expected`` to ``tolerance`` of its norm."""
    gap, size = (found - expected).norm(), expected.norm()
    return bool(torch.isfinite(gap) and size > 0 and gap <= tolerance * size)


@torch.no_grad()
def mlp_regression(layer: nn.Module, mlp: nn.Module, hidden: Sequence[torch.Tensor],
                   calls: Sequence[LayerCall], targets: Sequence[torch.Tensor], batches: range,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The MLP stage as a token-wise regression: the MLP's inputs over the ``batches``
    (tokens, 1, width) and what its output must be for the layer to hit the targets,
    target − (the layer's output with the MLP's output zero), (tokens, hidden); float32, on the
    CPU, as the targets are (the stage moves each mini-batch to ``device``). Each batch runs the
    layer with the MLP silenced (:class:`_Silenced`); the first also runs it whole.

    None, and the stage trains the whole layer, unless on the first batch: the MLP takes one
    tensor; run on the tokens one by one (a batch of sequences of one token) it gives the same
    output (it acts on each token alone: a mixture of experts capping its experts' loads, or an
    MLP mixing tokens, does not); and the layer's output is the silenced layer's output plus the
    MLP's (nonzero) output (a pre-norm residual layer: not a post-norm one, nor one that scales
    its MLP's output). Also None when the batches differ in shape or the two tensors would take
    more than half the memory free."""
    inputs = wanted = torch.empty(0)
    rows = 0
    stand_in: _Silenced | None = None
    for position, index in enumerate(batches):
        if stand_in is None:
            out, tap = _tapped(layer, mlp, calls[index], hidden[index], device)
            if tap.input is None or tap.output is None or tap.output.numel() != out.numel():
                return None
            stand_in = _Silenced(tap.returned, tap.input.shape)
        rest = _silenced(layer, mlp, calls[index], hidden[index], device, stand_in)
        if rest is None or stand_in.input is None:
            return None
        state, width = stand_in.input.float(), rest.shape[-1]
        count = rest.numel() // width
        if position == 0:
            assert tap.output is not None
            mlp_out = tap.output.float().reshape(out.shape)
            alone = _first(mlp(state.reshape(count, 1, -1)))
            if not (rest.shape == out.shape and _close(alone.float().reshape(out.shape), mlp_out)
                    and _close(out - rest, mlp_out)):
                return None
            free = available_bytes()
            need = 4 * count * len(batches) * (state.shape[-1] + width)
            if free is not None and need > free // 2:
                return None
            inputs = torch.empty(count * len(batches), 1, state.shape[-1])
            wanted = torch.empty(count * len(batches), width)
        inputs[rows:rows + count] = state.reshape(count, 1, -1).to("cpu")
        wanted[rows:rows + count] = (targets[index].to(device) - rest).reshape(count, width).to("cpu")
        rows += count
    return inputs[:rows], wanted[:rows]


@contextmanager
def _training_only(layer: nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """Only ``weights`` take gradients meanwhile; everything else in the layer is frozen."""
    flags = {param: param.requires_grad for param in layer.parameters()}
    for param in flags:
        param.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    try:
        yield
    finally:
        for param, flag in flags.items():
            param.grad = None
            param.requires_grad_(flag)


def _stage(layer: nn.Module, weights: list[torch.Tensor], settings: RecoverSettings, steps: int,
           loss_at: Callable[[int, int], torch.Tensor], judge: Callable[[], float] | None) -> list[float]:
    """One stage: Adam on ``weights`` (the parameters themselves, in their own layout: a
    Conv1D's is (in, out), and a transposed view would never receive a gradient), ``steps`` an
    epoch, ``loss_at(epoch, step)`` each; gradients and weights masked, so every zero stays.
    With a ``judge`` (the held-out error), returns it at the start and after each epoch, and
    leaves the weights of the lowest; without, returns []."""
    if not weights or steps < 1:
        return []
    masks = [w.detach() != 0 for w in weights]
    with _training_only(layer, weights):
        optimiser = torch.optim.Adam(weights, lr=settings.lr)
        errors = [judge()] if judge else []
        best = [w.detach().clone() for w in weights] if judge else []
        total = settings.epochs * steps
        for epoch in range(settings.epochs):
            with torch.enable_grad():
                for position in range(steps):
                    for group in optimiser.param_groups:
                        group["lr"] = step_size(settings, epoch * steps + position, total)
                    optimiser.zero_grad(set_to_none=True)
                    loss_at(epoch, position).backward()
                    for weight, mask in zip(weights, masks, strict=True):
                        if weight.grad is not None:
                            weight.grad.mul_(mask)
                    optimiser.step()
                    with torch.no_grad():
                        for weight, mask in zip(weights, masks, strict=True):
                            weight.mul_(mask)
            if judge:
                errors.append(judge())
                if errors[-1] < min(errors[:-1]):
                    best = [w.detach().clone() for w in weights]
        if judge:
            with torch.no_grad():
                for weight, kept in zip(weights, best, strict=True):
                    weight.copy_(kept)
    return errors


def _train(layer: nn.Module, linears: dict[str, nn.Module], attention: nn.Module | None,
           hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall], targets: Sequence[torch.Tensor],
           batches: range, device: torch.device, settings: RecoverSettings, upto_attention: bool,
           judge: Callable[[], float] | None) -> list[float]:
    """A stage on the layer's forward (up to the attention block's output with
    ``upto_attention``), a step per calibration batch, one batch at a time (offloaded
    activations stay on disk)."""

    def loss_at(epoch: int, position: int) -> torch.Tensor:
        index = batches[position]
        out = _forward(layer, attention, calls[index], hidden[index], device, upto_attention)
        reference = targets[index].to(device)
        return (out - reference).square().mean() / reference.square().mean().clamp_min(1e-30)

    weights = [_parameter(linear) for linear in linears.values()]
    return _stage(layer, weights, settings, len(batches), loss_at, judge)


def _train_tokens(layer: nn.Module, mlp: nn.Module, linears: dict[str, nn.Module], inputs: torch.Tensor,
                  wanted: torch.Tensor, steps: int, device: torch.device, settings: RecoverSettings,
                  judge: Callable[[], float] | None) -> list[float]:
    """The MLP stage as a regression on the tokens of :func:`mlp_regression`, shuffled afresh
    each epoch (a fixed seed) and cut into ``steps`` mini-batches."""
    generator = torch.Generator().manual_seed(SHUFFLE_SEED)
    squares = sum(float(part.square().sum()) for part in wanted.split(4096))  # no full-size temporary
    scale = torch.tensor(max(squares / max(wanted.numel(), 1), 1e-30), device=device)
    chunks: list[torch.Tensor] = []

    def loss_at(epoch: int, position: int) -> torch.Tensor:
        if position == 0:
            chunks[:] = torch.randperm(inputs.shape[0], generator=generator).tensor_split(steps)
        chunk = chunks[position]
        # (tokens, 1, hidden): each token a sequence of one, so a block that reads the batch
        # shape (a mixture of experts' router) sees a plain batch
        reference = wanted[chunk].to(device)
        out = _first(mlp(inputs[chunk].to(device))).float().reshape(reference.shape)  # Llama 4's: (tokens, hidden)
        return (out - reference).square().mean() / scale

    weights = [_parameter(linear) for linear in linears.values()]
    return _stage(layer, weights, settings, min(steps, inputs.shape[0]), loss_at, judge)


def recover_layer(layer: nn.Module, hidden: Sequence[torch.Tensor], calls: Sequence[LayerCall],
                  attention_targets: list[torch.Tensor] | None, output_targets: list[torch.Tensor],
                  device: torch.device, settings: RecoverSettings,
                  checkpoint: torch.dtype | None = None) -> dict[str, Any]:
    """Train the pruned ``layer``'s kept weights toward the dense targets (see the module);
    returns the held-out errors before and after and whether the recovery was kept.
    ``checkpoint``: the dtype the weights will be saved in, when narrower than the layer's: the
    trained weights are rounded to it before they are judged."""
    tick = time.perf_counter()
    storage, dtypes = next(layer.parameters()).dtype, floating_dtypes(layer)
    if storage != torch.float32:
        layer.float()
    linears = find_linears(layer)
    found = attention_block(layer)
    attention_names = {n for n in linears if found and n.startswith(found[0] + ".")}
    held = len(hidden) - 1  # the held-out batch (with one batch: also the training batch)
    train = range(held) if held > 0 else range(1)

    def judge() -> float:  # the whole layer's output error on the held-out batch
        return _relative_error(layer, hidden[held], calls[held], output_targets[held], device)

    before = judge()
    saved = {name: _parameter(linear).detach().clone() for name, linear in linears.items()}
    epochs: dict[str, list[float]] = {}
    each = judge if settings.keep == "best" else None
    if found and attention_targets is not None and attention_names:
        epochs["attention"] = _train(layer, {n: linears[n] for n in attention_names}, found[1], hidden, calls,
                                     attention_targets, train, device, settings, True, each)
    rest = {n: m for n, m in linears.items() if n not in attention_names}
    block = mlp_block(layer, list(rest)) if settings.mlp_steps > 0 and rest else None
    regression = mlp_regression(layer, block[1], hidden, calls, output_targets, train, device) if block else None
    on_tokens = block is not None and regression is not None
    if block and regression:
        epochs["mlp"] = _train_tokens(layer, block[1], rest, *regression, settings.mlp_steps * len(train),
                                      device, settings, each)
        del regression
    else:
        epochs["mlp"] = _train(layer, rest, None, hidden, calls, output_targets, train, device, settings, False,
                               each)
    if checkpoint is not None:
        with torch.no_grad():
            for linear in linears.values():
                weight = _parameter(linear)
                weight.copy_(weight.to(checkpoint).to(weight.dtype))
    after = _relative_error(layer, hidden[held], calls[held], output_targets[held], device)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for name, linear in linears.items():
                _parameter(linear).copy_(saved[name])
    if storage != torch.float32:
        restore_dtypes(layer, dtypes)  # each tensor to its own dtype (a float32 router stays float32)
    return {"error_before": before, "error_after": after if kept else before, "error_trained": after,
            "kept": kept, "epoch_errors": epochs, "mlp_on_tokens": on_tokens,
            "seconds": time.perf_counter() - tick}
