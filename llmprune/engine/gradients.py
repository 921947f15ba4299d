"""Gradients of the *network* loss for the saliency criteria that read them (OBD, first-order
Taylor), computed once on the dense model.

For every calibration sequence s (one backward each), with L_s its mean next-token loss:

    gradient_q = (1/S) Σ_s ∂L_s/∂w_q                (the mean gradient)
    fisher_q   = (1/S) Σ_s (∂L_s/∂w_q)²             (the diagonal empirical Fisher, OBD's h_qq)

Only the weights of the decoder layers' linear layers are tracked. Placement: the whole model
runs forward and backward on ``device`` (moved there and back), or, with one device per decoder
layer (a device map), each layer on its own device and the rest on ``device``, with hooks
carrying the hidden states between them (:func:`llmprune.engine.placement.placed`). Memory,
beyond the weights: one sequence's activations kept for backward, the current gradient of the
tracked weights (their dtype), and two fp32 accumulators the size of the tracked weights, on the
device of each weight (for SmolLM2-135M: about 0.9 GB in all). A float16 model's loss is scaled
by 2^12 before backward (and its gradients back), so small gradients do not underflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.engine.model import Conv1D, find_decoder_layers, find_linears
from llmprune.engine.placement import placed
from llmprune.errors import LlmpruneError
from llmprune.progress import Cancel, Progress, Steps

STAGE = "gradients"


@dataclass
class LossGradients:
    """Per tracked weight (full parameter name, the parameter's own orientation): the mean
    gradient and the mean squared gradient over ``sequences`` calibration sequences (fp32, CPU)."""

    mean: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    sequences: int

    def of(self, name: str, linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean gradient, Fisher) of ``linear`` (full module name) as (out, in), like its weight
        seen by the methods: a GPT-2 Conv1D stores (in, out)."""
        key = f"{name}.weight"
        if key not in self.mean:
            raise LlmpruneError(f"no gradients for {key}: they were computed on another model")
        mean, fisher = self.mean[key], self.fisher[key]
        if isinstance(linear, Conv1D):
            return mean.t(), fisher.t()
        return mean, fisher


def tracked_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The decoder layers' linear weights, by full parameter name."""
    layers_path, layers = find_decoder_layers(model)
    found: dict[str, nn.Parameter] = {}
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            weight = linear.weight
            assert isinstance(weight, nn.Parameter)
            found[f"{layers_path}.{index}.{name}.weight"] = weight
    return found


def gradient_moments(params: dict[str, nn.Parameter], losses: Iterable[Callable[[], torch.Tensor]],
                     steps: Steps | None = None, scale: float = 1.0) -> LossGradients:
    """Mean gradient and mean squared gradient of each of ``params`` over the ``losses`` (one
    backward each; each loss a zero-argument function, so only one graph is alive at a time).
    ``scale``: each loss is multiplied by it before backward and the gradients divided by it
    after (float16 weights: small gradients would underflow otherwise). The caller sets
    ``requires_grad``; nothing is left in ``.grad``."""
    mean = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    count = 0
    if steps is not None:
        steps(0)
    for loss_of in losses:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of() * scale, list(params.values()))
        for name, g in zip(params, grads, strict=True):
            g = g.float() / scale
            if not bool(torch.isfinite(g).all()):
                raise LlmpruneError(f"the gradient of {name} is not finite (sequence {count + 1}); in float16 "
                                    "compute them with --dtype float32 or bfloat16")
            mean[name] += g
            fisher[name] += g.square()
        del grads
        count += 1
        if steps is not None:
            steps(count)
    if count == 0:
        raise LlmpruneError("gradients need at least one calibration sequence")
    return LossGradients({n: (t / count).cpu() for n, t in mean.items()},
                         {n: (t / count).cpu() for n, t in fisher.items()}, count)


FLOAT16_SCALE = 2.0**12  # float16 gradients of a mean token loss sit near its smallest normals


def loss_gradients(model: nn.Module, calibration: torch.Tensor, device: torch.device,
                   layer_devices: Sequence[torch.device] | None = None, progress: Progress | None = None,
                   cancel: Cancel | None = None) -> LossGradients:
    """Mean gradient and diagonal empirical Fisher of the calibration loss (see the module),
    one sequence per backward. The model is left as it was: same placement, no ``.grad``, the
    same ``requires_grad`` flags. Progress: stage "gradients", in sequences; ``cancel`` is
    polled after each."""
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise LlmpruneError("gradients need (nsamples, seqlen >= 2) calibration token ids")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    devices = list(layer_devices) if layer_devices is not None and len(set(layer_devices)) > 1 else None
    try:
        with placed(model, device, devices):
            params = tracked_weights(model)  # after placement: the parameters the forward uses
            for n, p in model.named_parameters():
                p.requires_grad_(n in params)
            scale = FLOAT16_SCALE if any(p.dtype == torch.float16 for p in params.values()) else 1.0

            def loss_of(sequence: torch.Tensor) -> Callable[[], torch.Tensor]:
                ids = sequence[None].to(device)
                return lambda: model(input_ids=ids, labels=ids, use_cache=False).loss

            steps = Steps(progress, cancel, STAGE, calibration.shape[0], "sequences")
            return gradient_moments(params, (loss_of(sequence) for sequence in calibration), steps, scale)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
