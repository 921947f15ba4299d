"""Offline assets: fetched once into an empty cache, then reused (needs PyPI, as CI has)."""

import pytest

from llmprune.io import assets


@pytest.mark.slow
def test_fresh_cache_fetches_text_and_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "does" / "not" / "exist"))
    evaluation = assets.wikipedia_text("evaluation")
    calibration = assets.wikipedia_text("calibration")
    assert 900_000 < len(evaluation) < 1_050_000 and 900_000 < len(calibration) < 1_050_000
    assert evaluation[:200] not in calibration  # disjoint buckets
    folder = assets.smollm2_folder()
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    leftovers = [p.name for p in folder.parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # A second call reuses the cache without fetching: the wheels may even be gone.
    for wheel in (tmp_path / "does" / "not" / "exist" / "wheels").iterdir():
        wheel.unlink()
    assert assets.smollm2_folder() == folder
    assert assets.wikipedia_text("evaluation") == evaluation


def test_unknown_wikipedia_split_is_refused():
    with pytest.raises(assets.LlmpruneError, match="split"):
        assets.wikipedia_text("test")
