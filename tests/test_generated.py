"""Self-generated calibration windows: the sampling against a slow naive reference, what is kept
and replaced, determinism, refusals, and how a job resolves the count (the default recipe's
quarter in memory, none with a named method, streamed or device-mapped)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tiny
import torch

from llmprune.cli.commands import main
from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.engine.observe import InputNorms
from llmprune.errors import Cancelled, LlmpruneError
from llmprune.io import generated
from llmprune.io.generated import PREFIX, generated_windows, tokens_read
from llmprune.jobs.pipeline import EvalConfig, Job, run
from llmprune.progress import Event

CPU = torch.device("cpu")


def naive_draw(scores: torch.Tensor, forbidden: list[int]) -> torch.Tensor:
    """generated.draw written out: one uniform per row, then a walk along the vocabulary adding
    probabilities until the sum passes it."""
    probs = torch.softmax(scores.float(), -1)
    probs[:, forbidden] = 0.0
    u = torch.rand(scores.shape[0], 1) * probs.sum(-1, keepdim=True)
    tokens = []
    for row in range(scores.shape[0]):
        total, pick = 0.0, None
        for token, p in enumerate(probs[row].tolist()):
            total += p
            if total > u[row].item() and p > 0:
                pick = token
                break
        tokens.append(pick if pick is not None else int(probs[row].argmax()))
    return torch.tensor(tokens)


def naive(model, prompts: torch.Tensor, new: int, eos: int | list[int]) -> torch.Tensor:
    """Sampling at temperature 1 with no truncation, one full forward per token, EOS never drawn:
    what generate with a key/value cache must reproduce."""
    ids = prompts
    with torch.no_grad():
        for _ in range(new):
            logits = model(ids).logits[:, -1, :]
            ids = torch.cat([ids, generated.draw(logits, eos if isinstance(eos, list) else [eos])[:, None]], 1)
    return ids


def test_draw_known_answers(monkeypatch):
    scores = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.0, 0.5]]))
    real_rand = torch.rand
    for u, expect in [(0.0, [0, 0]), (0.05, [0, 0]), (0.15, [1, 0]), (0.29, [1, 0]), (0.31, [2, 0]),
                      (0.5, [2, 2]), (0.55, [2, 2]), (0.999, [2, 2])]:
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u))
        # Cumulative probabilities 0.1, 0.3, 1.0 and 0.5, 0.5, 1.0: the first above u; an id of
        # probability 0 (row 2, id 1) is never the answer, even at u = 0.5 exactly.
        assert generated.draw(scores, []).tolist() == expect, u
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, 0.5))
    assert generated.draw(scores, [0]).tolist() == [2, 2]  # row 1 renormalised to 2/9, 7/9
    # A uniform at the very total (rounding): past the last id, so the most likely allowed id.
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(shape))
    assert generated.draw(scores, []).tolist() == [2, 0]
    monkeypatch.setattr(torch, "rand", real_rand)
    torch.manual_seed(1)
    assert (generated.draw(scores.repeat(50, 1), [2]) != 2).all()  # a forbidden id is never drawn


def test_draw_equals_the_slow_walk_and_has_the_right_frequencies():
    torch.manual_seed(3)
    scores = torch.randn(40, 50) * 3
    torch.manual_seed(9)
    fast = generated.draw(scores, [4, 7])
    torch.manual_seed(9)
    slow = naive_draw(scores, [4, 7])
    assert torch.equal(fast, slow)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.manual_seed(0)
    counts = torch.bincount(generated.draw(probs.log().repeat(20000, 1), []), minlength=4) / 20000
    assert torch.allclose(counts, probs, atol=0.01)  # 20000 draws: standard error under 0.0035


def test_windows_equal_the_naive_sampler_batch_by_batch(tokenizer):
    model = tiny.llama(len(tokenizer))
    calibration = tiny.random_ids(generated.BATCH + 4, 20, len(tokenizer), seed=1)
    count = generated.BATCH + 2  # one piece a window (20 < CHUNK); two batches, one random stream
    out = generated_windows(model, tokenizer, calibration, count, 5, CPU)
    torch.manual_seed(5)
    first = naive(model, calibration[:generated.BATCH, :PREFIX], 20 - PREFIX, tokenizer.eos_token_id)
    second = naive(model, calibration[generated.BATCH:count, :PREFIX], 20 - PREFIX, tokenizer.eos_token_id)
    assert torch.equal(out[:count], torch.cat([first, second]))
    assert torch.equal(out[count:], calibration[count:])  # the rest stay real text
    assert out.shape == calibration.shape and out.dtype == calibration.dtype


def test_the_card_says_how_the_windows_were_cut():
    from llmprune.jobs.card import generated_note

    assert generated_note({"generated": 8, "seqlen": 512}) == (
        "; the first 8 written by the dense model itself, sampled (temperature 1) in 4 pieces of 128 tokens "
        "a window, each from the real window's first 4 tokens there")
    assert "in 2 pieces of 150 tokens" in generated_note({"generated": 1, "seqlen": 300})
    assert "in 3 pieces of 170-171 tokens" in generated_note({"generated": 1, "seqlen": 511})
    assert generated_note({"generated": 0, "seqlen": 512}) == ""


def test_pieces_are_near_equal_and_at_least_a_chunk():
    assert generated.CHUNK == 128
    assert generated.piece_bounds(512) == [0, 128, 256, 384, 512]
    assert generated.piece_bounds(2048) == list(range(0, 2049, 128))
    assert generated.piece_bounds(300) == [0, 150, 300]  # 2 pieces of 150, not 128 + 128 + 44
    assert generated.piece_bounds(100) == [0, 100]  # shorter than a chunk: sampled whole
    assert generated.piece_bounds(6) == [0, 6]


def test_long_windows_are_pieces_each_sampled_from_its_own_real_prefix(tokenizer, monkeypatch):
    monkeypatch.setattr(generated, "CHUNK", 8)
    monkeypatch.setattr(generated, "BATCH", 3)  # batches that cut across windows
    model = tiny.llama(len(tokenizer))
    calibration = tiny.random_ids(4, 21, len(tokenizer), seed=2)
    assert generated.piece_bounds(21) == [0, 10, 21]  # pieces of 10 and 11: 7 tokens sampled for each
    out = generated_windows(model, tokenizer, calibration, 3, 7, CPU)
    prompts = torch.stack([calibration[w, a:a + PREFIX] for w in range(3) for a in (0, 10)])
    torch.manual_seed(7)
    pieces = torch.cat([naive(model, prompts[i:i + 3], 7, tokenizer.eos_token_id) for i in range(0, 6, 3)])
    expected = torch.stack([torch.cat([pieces[2 * w, :10], pieces[2 * w + 1]]) for w in range(3)])
    assert torch.equal(out[:3], expected)
    assert torch.equal(out[:3, 10:10 + PREFIX], calibration[:3, 10:10 + PREFIX])  # each piece starts real
    assert torch.equal(out[3], calibration[3])


def test_the_models_own_generation_settings_do_not_bend_the_distribution(tokenizer):
    # A checkpoint's generation_config may carry penalties and banned or forced tokens; the
    # windows must still be drawn from the model's plain distribution (the naive sampler's).
    from transformers import GenerationConfig

    model = tiny.llama(len(tokenizer))
    own = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=1, suppress_tokens=list(range(100, 300)),
                           forced_eos_token_id=3, temperature=0.3, top_k=2, do_sample=True,
                           eos_token_id=[tokenizer.eos_token_id, 7])
    model.generation_config = own
    calibration = tiny.random_ids(3, 20, len(tokenizer), seed=4)
    out = generated_windows(model, tokenizer, calibration, 3, 2, CPU)
    torch.manual_seed(2)
    expected = naive(model, calibration[:, :PREFIX], 20 - PREFIX, [tokenizer.eos_token_id, 7])
    assert torch.equal(out, expected)
    assert model.generation_config is own  # handed back as it was
    assert not (out[:, PREFIX:] == 7).any()  # the model's other end-of-text id is never drawn


def test_draw_leaves_the_callers_scores_alone():
    scores = torch.zeros(2, 5)
    generated.draw(scores, [1, 3])
    assert torch.equal(scores, torch.zeros(2, 5))


def test_prefixes_kept_the_rest_replaced_and_seeded(tokenizer):
    model = tiny.llama(len(tokenizer))
    calibration = tiny.random_ids(6, 24, len(tokenizer))
    before = torch.random.get_rng_state()
    out = generated_windows(model, tokenizer, calibration, 4, 0, CPU)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    assert torch.equal(out[:4, :PREFIX], calibration[:4, :PREFIX])
    assert (out[:4, PREFIX:] != calibration[:4, PREFIX:]).float().mean() > 0.9
    assert not (out[:4, PREFIX:] == tokenizer.eos_token_id).any()  # no early end: every window full
    assert torch.equal(out, generated_windows(model, tokenizer, calibration, 4, 0, CPU))
    assert not torch.equal(out, generated_windows(model, tokenizer, calibration, 4, 1, CPU))
    assert generated_windows(model, tokenizer, calibration, 0, 0, CPU) is calibration
    assert not model.training


def test_progress_counts_windows_and_cancel_stops_it(tokenizer):
    model = tiny.llama(len(tokenizer))
    calibration = tiny.random_ids(10, 80, len(tokenizer))
    events: list[Event] = []
    generated_windows(model, tokenizer, calibration, 10, 0, CPU, progress=events.append)
    assert events[0] == Event("generate calibration", 0, 10, "windows")
    assert events[-1] == Event("generate calibration", 10, 10, "windows")
    assert [e.done for e in events] == sorted(e.done for e in events)
    polls = []
    with pytest.raises(Cancelled, match="generate calibration"):
        generated_windows(model, tokenizer, calibration, 10, 0, CPU, cancel=lambda: bool(polls.append(1)) or
                          len(polls) > 2)
    assert len(polls) == 3  # stopped inside the first batch, at its second token poll


@pytest.mark.parametrize("value, message", [(-1, "integer >= 0"), (True, "integer >= 0"), (1.5, "integer >= 0"),
                                            (9, "more than the 8 calibration samples")])
def test_bad_counts_are_refused_in_one_line(value, message):
    with pytest.raises(LlmpruneError, match=message):
        CalibrationConfig("pydoc", 8, 64, 0, value)


@pytest.mark.parametrize("seqlen", [32, 260])
def test_the_model_reads_each_token_once_while_writing_and_tokens_read_says_how_many(tokenizer, seqlen):
    # With its key/value cache the model reads each piece's prompt, then each drawn token but the
    # last: 32 tokens are one piece (31 read), 260 two pieces of 130 (129 read each).
    assert tokens_read(8, 512) == 8 * 4 * 127 and tokens_read(1, 32) == 31 and tokens_read(2, 260) == 2 * 2 * 129
    model = tiny.llama(len(tokenizer))
    with InputNorms(model) as seen:
        generated_windows(model, tokenizer, tiny.random_ids(3, seqlen, len(tokenizer)), 2, 0, CPU)
    assert seen.tokens == tokens_read(2, seqlen)
    assert all(len(layer) == 7 for layer in seen.result)  # every linear of every layer ran


def test_windows_too_short_to_continue_are_refused(tokenizer):
    with pytest.raises(LlmpruneError, match="longer than 5 tokens"):
        generated_windows(tiny.llama(len(tokenizer)), tokenizer, tiny.random_ids(4, 5, len(tokenizer)), 2, 0, CPU)


def job(model: Path, text: Path, out: Path | None, prune: PruneConfig, generated_count=None, **kw) -> Job:
    return Job(model=str(model), prune=prune, calibration=CalibrationConfig(str(text), 8, 32, 0, generated_count),
               evaluation=EvalConfig(None), out=str(out) if out else None, device="cpu", batch_size=4, **kw)


def test_the_default_recipe_generates_a_quarter_and_says_so(llama_dir, text_file, tmp_path):
    events: list[Event] = []
    record = run(job(llama_dir, text_file, tmp_path / "out", PruneConfig(sparsity=0.5)), progress=events.append)
    assert record["calibration"]["generated"] == 2  # 8 samples // 4
    assert record["recipe"]["calibration"]["generated"] == 2  # the recipe replays the same windows
    assert "generate_s" in record["timings"]
    assert events[-1].stage == "save" and Event("generate calibration", 2, 2, "windows") in events
    card = (tmp_path / "out" / "README.md").read_text()
    assert "the first 2 written by the dense model itself" in card and "in one piece a window" in card
    # The default's refit stops after 4 conjugate-gradient steps: said in the record and the card.
    assert record["resolved_options"]["cg_iterations"] == 4 and "4 conjugate-gradient steps" in card
    # The same windows as asked for explicitly: the default is exactly generated=2.
    named = run(job(llama_dir, text_file, None, PruneConfig(sparsity=0.5), 2))
    assert named["layers"] == record["layers"]


def test_at_70_percent_owl_reads_the_norms_of_the_tokens_the_model_wrote(llama_dir, text_file, tmp_path):
    # The default at 70% allocates by OWL: its input norms are those of the generated windows'
    # tokens as the model read them while writing (each of the 2 windows, 32 tokens, is one piece:
    # 4 real ones, then 27 steps each reading the token drawn before; the last is never read).
    record = run(job(llama_dir, text_file, tmp_path / "out", PruneConfig(sparsity=0.7)))
    allocation = record["allocation"]
    assert record["resolved_options"]["allocation"] == "owl" and record["calibration"]["generated"] == 2
    assert allocation["samples"] == 0 and allocation["generated_tokens"] == 2 * (32 - 1)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "input norms of the 62 tokens the dense model read while writing calibration windows" in card
    # Without generated windows, or with fewer than a quarter of the 8 samples its pass would
    # read, OWL makes its own pass over the first calibration samples (all 8 here).
    for count in (0, 1):
        real = run(job(llama_dir, text_file, None, PruneConfig(sparsity=0.7), count))
        assert real["calibration"]["generated"] == count
        assert real["allocation"]["samples"] == 8 and "generated_tokens" not in real["allocation"]


def test_a_named_method_generates_nothing_unless_asked(llama_dir, text_file):
    plain = run(job(llama_dir, text_file, None, PruneConfig("wanda", sparsity=0.5)))
    assert plain["calibration"]["generated"] == 0 and "generate_s" not in plain["timings"]
    asked = run(job(llama_dir, text_file, None, PruneConfig("wanda", sparsity=0.5), 3))
    assert asked["calibration"]["generated"] == 3
    assert asked["layers"] != plain["layers"]  # other windows, other statistics, another mask


def test_streaming_refuses_an_explicit_count_and_skips_the_default(llama_dir, text_file, tmp_path, caplog):
    with pytest.raises(LlmpruneError, match="streaming run never holds"):
        run(job(llama_dir, text_file, tmp_path / "a", PruneConfig(sparsity=0.5), 2, stream="on"))
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.INFO, logger="llmprune.jobs.pipeline"):
        record = run(job(llama_dir, text_file, tmp_path / "b", PruneConfig(sparsity=0.5), stream="on"))
    assert record["calibration"]["generated"] == 0 and record["streaming"]
    assert "self-generated calibration windows are left out" in caplog.text
    with pytest.raises(LlmpruneError, match="drop --device-map"):
        run(job(llama_dir, text_file, None, PruneConfig(sparsity=0.5), 2, device_map="auto"))


def test_the_cli_takes_generated_and_prints_it(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(text_file),
            "--nsamples", "4", "--seqlen", "32", "--eval", "none", "--device", "cpu"]
    assert main([*args, "--generated", "3", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "3 of the windows written by the dense model" in capsys.readouterr().out
    assert json.loads((out / "llmprune.json").read_text())["calibration"]["generated"] == 3
    assert main([*args, "--generated", "5", "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "calibration generated=5 is more than the 4 calibration samples" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3", "opt", "gpt2", "phi3", "mixtral", "qwen2_moe",
                                  "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4"])
def test_every_tiny_architecture_writes_full_windows(tokenizer, arch, monkeypatch):
    # The default recipe samples from whatever decoder it is given, dense or mixture-of-experts,
    # in pieces as it does with real window lengths (two of 12 here).
    monkeypatch.setattr(generated, "CHUNK", 12)
    model = getattr(tiny, arch)(len(tokenizer))
    calibration = tiny.random_ids(3, 24, len(tokenizer))
    out = generated_windows(model, tokenizer, calibration, 2, 0, CPU)
    assert out.shape == calibration.shape and torch.equal(out[:2, :PREFIX], calibration[:2, :PREFIX])
    assert torch.equal(out[:2, 12:12 + PREFIX], calibration[:2, 12:12 + PREFIX])
    assert torch.equal(out[2:], calibration[2:]) and not torch.equal(out[:2], calibration[:2])


def test_the_default_skips_windows_too_short_to_continue(llama_dir, text_file):
    short = Job(model=str(llama_dir), prune=PruneConfig(sparsity=0.5),
                calibration=CalibrationConfig(str(text_file), 8, 5), evaluation=EvalConfig(None), device="cpu")
    assert run(short)["calibration"]["generated"] == 0
