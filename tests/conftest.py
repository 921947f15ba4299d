"""Session fixtures: the tiny tokenizer (trained once) and tiny model folders for CLI runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The helpers in tests/tiny.py are imported as `tiny`, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))

import tiny


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.train_tokenizer()


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A loadable model folder: tiny Llama + tiny tokenizer. Tests must not modify it."""
    return _save(tiny.llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def awkward_dir(tmp_path_factory, tokenizer) -> Path:
    return _save(tiny.awkward_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("models") / "awkward")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """Plain-text calibration and evaluation data (Python's documentation topics)."""
    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text(tiny.pydoc_text(), encoding="utf-8")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item, so a fixture's teardown knows whether the test
    failed (the browser tests then save a screenshot)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)
