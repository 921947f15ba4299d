"""The public API: importable without side effects, and usable on an in-memory model."""

import subprocess
import sys

import pytest
import torch
from tiny import llama as build_llama

import llmprune


def test_import_has_no_side_effects():
    code = ("import sys, llmprune; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
            "print(llmprune.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == llmprune.__version__


def test_public_names_resolve():
    for name in llmprune.__all__:
        assert getattr(llmprune, name) is not None
    with pytest.raises(AttributeError):
        _ = llmprune.no_such_name


def test_prune_in_memory_with_progress_and_cancel():
    model = build_llama()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    report = llmprune.prune(model, llmprune.PruneConfig(method="wanda", pattern="2:4"), ids,
                            progress=lambda event: seen.append(event))
    layers = model.config.num_hidden_layers
    # The stage's start (0 layers done, once the inputs are captured), then one event per layer.
    assert seen == [llmprune.Event("prune", i, layers, "layers") for i in range(layers + 1)]
    assert report.sparsity == pytest.approx(0.5)

    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1  # let the first layer run, then stop

    with pytest.raises(llmprune.Cancelled, match="after 1 of"):
        llmprune.prune(build_llama(), llmprune.PruneConfig(method="magnitude"), ids, cancel=cancel)
