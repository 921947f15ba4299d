"""Bridging dropped layers: the last kept layer before a run of dropped decoder layers takes over,
as far as a linear map can, what those layers added to the residual stream.

A dropped run adds Δ = f(h) − h to the kept layer's output h. The kept layer's down_proj writes
W a into the stream (a: its input, the MLP activations), so refitting it as W + D with

    D = argmin_D Σ_tokens ‖Δ − D a‖² + λ‖D‖² = C (G + λI)⁻¹,   C = Σ Δ aᵀ,  G = Σ a aᵀ

moves the best linear part of Δ into the model at no cost in size or speed (training-free, in the
spirit of ReplaceMe's linear replacement of pruned blocks). Only the channels the layer keeps are
refitted; removed ones stay zero. Worked example: if Δ = M a exactly, D = M (up to damping) and the
dropped run is reproduced exactly; if Δ = 0, D = 0 and nothing changes.

The linear model needs down_proj's output to reach the residual stream as it is. Where it does
not (Gemma's post-feed-forward norm, Granite's residual multiplier), the refit is checked: it is
kept only if it measurably brings the layer's outputs closer to the dropped run's on a
calibration batch held out of the fit, and the share it carries is that measured one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llmprune.core.factor import damped_inverse
from llmprune.engine.capture import LayerCall
from llmprune.engine.driver import run_batches
from llmprune.engine.model import get_weight, set_weight


def fit_bridge(G: torch.Tensor, C: torch.Tensor, keep: Sequence[int], damp: float) -> torch.Tensor:
    """D (out × in, zero outside ``keep``) minimising Σ‖Δ − D a‖², from G = Σ a aᵀ (in × in) and
    C = Σ Δ aᵀ (out × in), with ``damp`` · mean(diag) added to G's diagonal."""
    index = torch.tensor(list(keep), device=G.device)
    G_kk = G[index][:, index].double()
    inverse, _ = damped_inverse(G_kk, damp)
    C_k = C[:, index].double()
    D_k = C_k @ inverse
    D = torch.zeros(C.shape, dtype=torch.float64, device=C.device)
    D[:, index] = D_k
    return D


@torch.no_grad()
def bridge(layer: nn.Module, down: nn.Module, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
           calls: Sequence[LayerCall], dropped: Sequence[tuple[nn.Module, Sequence[LayerCall]]],
           keep: Sequence[int], damp: float, device: torch.device) -> tuple[list[torch.Tensor], float]:
    """Refit ``down`` (in ``layer``, already on ``device``) so that ``layer`` also adds what the
    ``dropped`` layers (each with its calls, in order after ``layer``) would have added to its
    ``outputs`` for ``inputs``. Returns ``layer``'s outputs afterwards and the share of the
    dropped layers' contribution they now carry, measured on the last batch, held out of the
    fit that is judged (the kept fit then uses every batch). Where the fit does
    not help (an architecture whose MLP output is normalised or scaled before the residual add,
    so the linear model above does not hold), the weight is put back and the share is 0."""
    # What the dropped run would add, one dropped layer on the device at a time.
    aims: list[torch.Tensor] = list(outputs)
    for module, module_calls in dropped:
        home = next(module.parameters()).device
        try:
            module.to(device)
            aims = list(run_batches(module, aims, module_calls, device, []))
        finally:
            module.to(home)
    seen: list[torch.Tensor] = []
    hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    # The last batch is held out: the fit is judged on tokens it was not fitted on. (With one
    # batch there is nothing to hold out, and it is judged on its own tokens.)
    held = len(inputs) - 1 if len(inputs) > 1 else None
    sums: dict[bool, list[torch.Tensor]] = {}  # held out or not -> [G, C]
    before = 0.0
    try:
        for index, (call, state, aim) in enumerate(zip(calls, inputs, aims, strict=True)):
            seen.clear()
            out = call.run(layer, state, device).double()
            a = seen[0].float()
            delta = (aim.to(device).double() - out).reshape(-1, out.shape[-1]).float()
            G, C = sums.setdefault(index == held, [torch.zeros(a.shape[1], a.shape[1], device=a.device),
                                                   torch.zeros(delta.shape[1], a.shape[1], device=a.device)])
            G += a.T @ a
            C += delta.T @ a
            if held is None or index == held:
                before += float(delta.double().square().sum())
    finally:
        hook.remove()
    G, C = sums[False]
    W = get_weight(down).detach().clone()
    set_weight(down, W.double() + fit_bridge(G, C, keep, damp).to(W.device))
    judged = [held] if held is not None else list(range(len(inputs)))
    trial = list(run_batches(layer, [inputs[i] for i in judged], [calls[i] for i in judged], device, []))
    after = sum(float((aims[i].double() - out.double()).square().sum()) for i, out in zip(judged, trial, strict=True))
    if before == 0 or after >= before:
        set_weight(down, W)
        return list(outputs), 0.0
    if held is not None:  # accepted: the final fit uses every calibration token
        G_held, C_held = sums[True]
        set_weight(down, W.double() + fit_bridge(G + G_held, C + C_held, keep, damp).to(W.device))
    return list(run_batches(layer, inputs, calls, device, [])), 1 - after / before
