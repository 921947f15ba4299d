"""Perplexity with the published protocol (non-overlapping windows of the joined test text)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

CE_ROWS = 256  # token positions per cross-entropy call: bounds its log-softmax copy (~50 MB at 49k vocab)


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Σ −log p(ids[t+1] | ids[:t+1]) over all positions, without copying the (batch, seqlen,
    vocab) logits: the last position of each row gets no target, instead of slicing it off."""
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    total = 0.0
    for start in range(0, flat.shape[0], CE_ROWS):
        total += nn.functional.cross_entropy(
            flat[start : start + CE_ROWS].float(), flat_targets[start : start + CE_ROWS],
            reduction="sum", ignore_index=-100,
        ).item()
    return total


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (n, seqlen).

    Each window is scored on its own (no context carried over), as in GPTQ/SparseGPT/Wanda;
    the mean is over all predicted tokens, n · (seqlen − 1).
    """
    model.eval()
    run_device = torch.device(device) if device else next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(run_device)
        logits = model(input_ids=batch, use_cache=False).logits
        total_nll += summed_nll(logits, batch)
        total_tokens += batch[:, 1:].numel()
        if progress is not None:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return math.exp(total_nll / total_tokens)
