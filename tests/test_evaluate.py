"""Perplexity against a naive per-position computation."""

from __future__ import annotations

import math

import pytest
import tiny
import torch

import llmprune.eval.perplexity as evaluate


def naive_perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()
            for t in range(window.shape[0] - 1):
                nll -= torch.log_softmax(logits[t], dim=-1)[window[t + 1]].item()
                count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_perplexity_matches_naive_mean_nll(batch_size, monkeypatch):
    monkeypatch.setattr(evaluate, "CE_ROWS", 7)  # chunks that straddle window boundaries
    model = tiny.llama()
    windows = tiny.random_ids(5, 12, seed=3)
    expected = naive_perplexity(model, windows)
    assert evaluate.perplexity(model, windows, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
