"""Bridging dropped layers: the last kept layer before a run of dropped decoder layers takes over,
as far as a linear map can, what those layers added to the residual stream.

A dropped run adds Δ = f(h) − h to the kept layer's output h. The kept layer's down_proj writes
W a into the stream (a: its input, the MLP activations), so refitting it as W + D with

    D = argmin_D Σ_tokens ‖Δ − D a‖² + λ‖D‖² = C (G + λI)⁻¹,   C = Σ Δ aᵀ,  G = Σ a aᵀ

moves the best linear part of Δ into the model at no cost in size or speed (training-free, in the
spirit of ReplaceMe's linear replacement of pruned blocks). Only the channels the layer keeps are
refitted; removed ones stay zero. Worked example: if Δ = M a exactly, D = M (up to damping) and the
dropped run is reproduced exactly; if Δ = 0, D = 0 and nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llmprune.capture import LayerCall
from llmprune.driver import _run
from llmprune.model import get_weight, set_weight
from llmprune.structured.obs import damped_inverse


def fit_bridge(G: torch.Tensor, C: torch.Tensor, keep: Sequence[int], damp: float) -> tuple[torch.Tensor, float]:
    """D (out × in, zero outside ``keep``) minimising Σ‖Δ − D a‖², from G = Σ a aᵀ (in × in) and
    C = Σ Δ aᵀ (out × in), with ``damp`` · mean(diag) added to G's diagonal; and by how much the
    fit lowers the squared error Σ‖Δ‖² (2 tr(D Cᵀ) − tr(D G Dᵀ), undamped)."""
    index = torch.tensor(list(keep), device=G.device)
    G_kk = G[index][:, index].double()
    inverse, _ = damped_inverse(G_kk, damp)
    C_k = C[:, index].double()
    D_k = C_k @ inverse
    gain = float(2 * (D_k * C_k).sum() - (D_k @ G_kk * D_k).sum())
    D = torch.zeros(C.shape, dtype=torch.float64, device=C.device)
    D[:, index] = D_k
    return D, gain


@torch.no_grad()
def bridge(layer: nn.Module, down: nn.Module, inputs: Sequence[torch.Tensor], calls: Sequence[LayerCall],
           dropped: Sequence[tuple[nn.Module, Sequence[LayerCall]]], keep: Sequence[int], damp: float,
           device: torch.device) -> tuple[list[torch.Tensor], float]:
    """Refit ``down`` (in ``layer``) so that ``layer`` also adds what the ``dropped`` layers (each
    with its calls, after ``layer`` in this order) would have added; returns ``layer``'s new
    outputs for ``inputs`` and the share of the dropped layers' contribution the fit explains."""
    homes = [next(m.parameters()).device for m, _ in dropped]
    for module, _ in dropped:
        module.to(device)
    layer.to(device)
    seen: list[torch.Tensor] = []
    hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    G = C = None
    total = 0.0
    try:
        # One batch at a time: only G and C are kept, not every token's activations.
        for b, state in enumerate(inputs):
            seen.clear()
            out = calls[b].run(layer, state, device)
            aim = out
            for module, module_calls in dropped:
                aim = module_calls[b].run(module, aim, device)
            a = seen[0].double()
            delta = (aim - out).reshape(-1, out.shape[-1]).double()
            if G is None or C is None:
                G = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
                C = torch.zeros(delta.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
            G += a.T @ a
            C += delta.T @ a
            total += float(delta.square().sum())
    finally:
        hook.remove()
        for (module, _), home in zip(dropped, homes, strict=True):
            module.to(home)
    assert G is not None and C is not None
    D, gain = fit_bridge(G, C, keep, damp)
    W = get_weight(down).detach()
    set_weight(down, W.double() + D.to(W.device))
    outputs = list(_run(layer, inputs, calls, device, []))
    return outputs, gain / total if total > 0 else 0.0
