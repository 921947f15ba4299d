"""Perplexity against a naive per-position computation."""

from __future__ import annotations

import copy
import math

import pytest
import tiny
import torch

import llmprune.eval.perplexity as evaluate
from llmprune.engine.placement import move_front, spread


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


def full_logits_perplexity(model, windows: torch.Tensor) -> float:
    """The previous implementation: the model's own (batch, seqlen, vocab) logits."""
    with torch.no_grad():
        total = sum(evaluate.summed_nll(model(input_ids=w[None], use_cache=False).logits, w[None]) for w in windows)
    return math.exp(total / windows[:, 1:].numel())


def head_rows(model) -> list[int]:
    """Rows each call of the output head gets (the logits it makes are rows x vocab)."""
    rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    return rows


def test_chunked_perplexity_equals_full_logits_at_a_50k_vocabulary():
    model = tiny.llama(vocab_size=50_000)
    windows = tiny.random_ids(3, 600, vocab_size=50_000, seed=4)  # 600 > CE_ROWS: several chunks a window
    expected = full_logits_perplexity(model, windows)
    rows = head_rows(model)
    assert evaluate.perplexity(model, windows, batch_size=3) == pytest.approx(expected, rel=1e-6)
    assert max(rows[1:]) <= evaluate.CE_ROWS  # after the probe, never a whole window's logits


def test_soft_capped_logits_are_capped_in_the_chunks_too():
    from transformers import Gemma3ForCausalLM

    base = tiny.gemma3()
    config = copy.deepcopy(base.config)
    config.final_logit_softcapping = 0.5  # small: the cap changes every logit
    model = Gemma3ForCausalLM(config)
    model.load_state_dict(base.state_dict())
    model.eval()
    windows = tiny.random_ids(2, 20, seed=5)
    head = evaluate.loss_head(model, windows[:1, :evaluate.PROBE])
    assert head is not None and head.cap == 0.5
    expected = full_logits_perplexity(model, windows)
    assert evaluate.perplexity(model, windows) == pytest.approx(expected, rel=1e-6)
    assert full_logits_perplexity(base, windows) != pytest.approx(expected, rel=1e-2)  # the cap matters


def test_a_head_the_probe_cannot_reproduce_falls_back_to_full_logits():
    model = tiny.llama()
    forward = type(model).forward

    def scaled(self, *args, **kwargs):  # an unknown step after the head: logits doubled
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = scaled.__get__(model)
    windows = tiny.random_ids(2, 20, seed=6)
    assert evaluate.loss_head(model, windows[:1, :evaluate.PROBE]) is None
    assert evaluate.perplexity(model, windows) == pytest.approx(full_logits_perplexity(model, windows), rel=1e-6)


def test_moving_the_front_keeps_a_tied_head_with_the_embeddings():
    """Layer-wise evaluation moves the tensors outside the decoder layers to the device; a tied
    head must go along (else, on a GPU, it stays on the CPU: a device mismatch in the loss)."""
    model = tiny.gemma3()  # ties its head to the embeddings
    move_front(model, "model.layers", torch.device("meta"))  # any device other than the CPU
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "meta"
    assert next(model.model.layers.parameters()).device.type == "cpu"  # the layers stay


def test_a_spread_model_gives_the_same_logits_and_is_left_as_it_was():
    """lm-eval under a device map runs the model spread over the map's devices (each layer where
    the map puts it, hooks carrying the hidden states); on this machine every device is the CPU,
    so the check is that the hooks change no number, and that nothing is left behind."""
    model = tiny.gemma3()
    ids = tiny.random_ids(2, 12, seed=4)
    with torch.no_grad():
        expected = model(ids).logits
        cpu = torch.device("cpu")
        with spread(model, "model.layers", [cpu] * len(model.model.layers), cpu):
            assert all(layer._forward_pre_hooks and layer._forward_hooks for layer in model.model.layers)
            spread_logits = model(ids).logits
            generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(spread_logits, expected)
    assert generated.shape == (1, 7)
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in model.model.layers)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_spread_needs_a_device_for_every_layer():
    model = tiny.llama()
    with pytest.raises(ValueError), spread(model, "model.layers", [torch.device("cpu")], torch.device("cpu")):
        pass
    assert not any(layer._forward_pre_hooks for layer in model.model.layers)
