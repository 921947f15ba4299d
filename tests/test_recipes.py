"""Recipes: YAML ↔ job dataclasses, "did you mean", --set, and CLI flags ≡ recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmprune.cli.commands import _prune_parser, job_data
from llmprune.engine.config import CalibrationConfig, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.jobs.pipeline import EvalConfig, Job, TasksConfig
from llmprune.jobs.recipe import apply_set, job_from_dict, job_to_dict, load_recipe
from llmprune.structured.run import StructuredConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def from_cli(argv: list[str]) -> Job:
    return job_from_dict(job_data(_prune_parser().parse_args(argv), argv))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_and_validates(path):
    job = load_recipe(path)
    assert job.model and job.out
    assert job_from_dict(job_to_dict(job)) == job  # round trip
    if isinstance(job.prune, PruneConfig):
        job.prune.options()


def test_recipes_cover_the_common_jobs():
    names = {p.stem for p in RECIPES}
    for wanted in ("llama3-8b-sparsegpt-2of4", "llama3-8b-sparsegpt-50", "qwen2.5-7b-sparsegpt-2of4",
                   "qwen2.5-7b-sparsegpt-50", "llama3-8b-wanda-50", "smollm2-demo", "smollm2-structured-20"):
        assert wanted in names


def test_recipe_maps_one_to_one_onto_the_dataclasses(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
model: smollm2-135m
prune: {method: wanda, pattern: "4:8", sparsity: null}
calibration: {source: pydoc, samples: 16, seqlen: 256, seed: 3}
evaluation: {source: null}
tasks: {names: [arc_easy], limit: 20}
out: ./x
""")
    job = load_recipe(recipe)
    assert job == Job(model="smollm2-135m", prune=PruneConfig("wanda", "4:8", None),
                      calibration=CalibrationConfig("pydoc", 16, 256, 3), evaluation=EvalConfig(None),
                      tasks=TasksConfig(("arc_easy",), limit=20.0), out="./x")
    structured = job_from_dict({"model": "m", "prune": {"pattern": "heads", "sparsity": 0.25, "score": "flap"}})
    assert structured.prune == StructuredConfig("heads", 0.25, score="flap")


@pytest.mark.parametrize("data, message", [
    ({"model": "m", "calibration": {"nsample": 4}},
     "unknown recipe key calibration.nsample; did you mean calibration.samples?"),
    ({"model": "m", "prune": {"methd": "wanda"}}, "did you mean prune.method?"),
    ({"model": "m", "ouput": "x"}, "unknown recipe key ouput; did you mean out?"),
    ({"model": "m", "calibration": {"samples": "many"}}, "calibration.samples: expected an integer, got 'many'"),
    ({"model": "m", "prune": {"pattern": 124}}, "quote N:M patterns"),
    ({"model": "m", "prune": {"pattern": "3:2"}}, "prune: N:M pattern needs"),
    ({"model": "m", "prune": {"sparsity": 1.5}}, "sparsity must be in [0, 1)"),
    ({"model": "m", "prune": {"group": "column"}}, "prune.group: expected one of 'row', 'layer', 'global' or null"),
    ({"prune": {"method": "wanda"}}, "model is required"),
    ({"model": "m", "overwrite": "yes"}, "overwrite: expected true or false"),
])
def test_malformed_recipe_names_the_key(data, message):
    with pytest.raises(LlmpruneError) as caught:
        job_from_dict(data)
    assert message in str(caught.value)


def test_set_overrides_with_typed_values():
    data: dict = {"model": "m", "prune": {"pattern": "unstructured", "sparsity": 0.5}}
    apply_set(data, "calibration.samples=64")
    apply_set(data, "prune.pattern=2:4")  # a string field takes the text as is (YAML would read 124)
    apply_set(data, "prune.sparsity=null")
    apply_set(data, "evaluation.source=none")
    job = job_from_dict(data)
    assert job.calibration.samples == 64 and job.prune.pattern == "2:4" and job.evaluation.source is None
    with pytest.raises(LlmpruneError, match=r"did you mean calibration\.samples"):
        apply_set(data, "calibration.sample=64")
    with pytest.raises(LlmpruneError, match="KEY=VALUE"):
        apply_set(data, "calibration.samples")


def test_cli_flags_and_recipe_give_the_same_job(tmp_path):
    argv = ["--model", "smollm2-135m", "--method", "wanda", "--pattern", "2:4", "--calib", "pydoc",
            "--nsamples", "16", "--seqlen", "256", "--eval", "none", "--out", "x", "--eval-tasks", "arc_easy,piqa",
            "--tasks-limit", "50"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
model: smollm2-135m
prune: {method: wanda, pattern: "2:4", sparsity: null}
calibration: {source: pydoc, samples: 16, seqlen: 256}
evaluation: {source: null}
tasks: {names: [arc_easy, piqa], limit: 50}
out: x
""")
    assert from_cli(argv) == load_recipe(recipe)
    # Defaults agree too: the bare command line and the bare recipe.
    assert from_cli(["--model", "m"]) == job_from_dict({"model": "m"})
    assert from_cli(["--model", "m", "--shrink", "0"]) == job_from_dict({"model": "m", "prune": {"shrink": 0.0}})
    # The default recipe's shrinkage at 50% (RIA's mask and the refit), a named method's own (0.1) otherwise.
    assert from_cli(["--model", "m"]).prune.shrink == 0.4
    assert from_cli(["--model", "m", "--method", "sparsegpt"]).prune.shrink == 0.1
    structured = ["--model", "m", "--pattern", "structured", "--params", "0.2"]
    assert from_cli(structured) == job_from_dict({"model": "m", "prune": {"pattern": "structured", "params": 0.2}})
    depth = from_cli([*structured, "--drop-layers", "3", "--no-bridge"]).prune
    assert depth == StructuredConfig("structured", params=0.2, drop_layers=3, bridge=False)


def test_recipe_then_flags_then_set(tmp_path):
    recipe = Path(__file__).parent.parent / "recipes" / "llama3-8b-sparsegpt-2of4.yaml"
    argv = ["--recipe", str(recipe), "--set", "calibration.samples=64", "--model", "smollm2-135m",
            "--out", "y"]
    job = from_cli(argv)
    assert job.model == "smollm2-135m" and job.calibration.samples == 64 and job.out == "y"
    assert job.prune == PruneConfig("sparsegpt", "2:4", None) and job.calibration.source == "c4"
    assert job.tasks.names[:2] == ("arc_easy", "arc_challenge")


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
    from llmprune.cli.commands import main

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: m\nprune: {metod: wanda}\n")
    assert main(["--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean prune.method?" in err
    recipe.write_text("model: [unclosed\n")
    assert main(["--recipe", str(recipe)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
