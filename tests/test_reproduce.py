"""scripts/reproduce.py: every row's command is a valid llmprune command that runs the recipe
its name says (the grid itself is a benchmark, run by hand: minutes per row)."""

import importlib.util
from pathlib import Path

import pytest

from llmprune.cli.commands import _prune_parser, job_data
from llmprune.core.patterns import Pattern
from llmprune.engine.config import default_recipe
from llmprune.jobs.recipe import job_from_dict

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reproduce.py"
spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
assert spec is not None and spec.loader is not None
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def job_of(recipe, setting):
    argv = reproduce.command(recipe, setting, "pydoc", 2, Path("record.json"))[1:]
    return job_from_dict(job_data(_prune_parser().parse_args(argv), argv))


@pytest.mark.parametrize("setting", list(reproduce.SETTINGS))
@pytest.mark.parametrize("recipe", list(reproduce.RECIPES))
def test_every_row_is_a_valid_command(recipe, setting):
    if recipe in reproduce.UNSTRUCTURED_ONLY and ":" in setting:
        return
    config = job_of(recipe, setting).prune
    assert config.target_sparsity == pytest.approx(float(reproduce.SETTINGS[setting][1]) if ":" not in setting else 0.5)
    name = recipe.split("+")[0]
    if name == "default":
        pattern = Pattern.parse(setting if ":" in setting else "unstructured")
        for key, value in default_recipe(pattern, config.target_sparsity).items():
            assert getattr(config, key) == value, (key, recipe, setting)
    else:
        assert config.method == name
    if recipe.endswith("+refit"):
        assert config.update == "admm" and config.admm_iterations == 0
    assert (config.recover == "blockwise") == ("recover" in recipe or "schedule" in recipe)


def test_sparsegpt_refit_row_at_60_percent_is_the_default():
    """At 60% the default is SparseGPT + refit at a named method's own shrinkage (0.1); at 50%
    the default shrinks more (0.25), so the rows differ there."""
    default = job_of("default", "60%").prune
    row = job_of("sparsegpt+refit", "60%").prune
    for key in ("method", "update", "admm_iterations", "shrink", "refine", "allocation"):
        assert getattr(row, key) == getattr(default, key), key
    assert job_of("default", "50%").prune.shrink == 0.25 != job_of("sparsegpt+refit", "50%").prune.shrink
