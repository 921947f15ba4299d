"""scripts/reproduce.py: every row's command is a valid llmprune command that runs the recipe
its name says (the grid itself is a benchmark, run by hand: minutes per row)."""

import importlib.util
from pathlib import Path

import pytest

from llmprune.cli.commands import _prune_parser, job_data
from llmprune.jobs.recipe import job_from_dict

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reproduce.py"
spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
assert spec is not None and spec.loader is not None
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def job_of(recipe, setting):
    argv = reproduce.command(recipe, setting, "pydoc", 2, Path("record.json"))[1:]
    return job_from_dict(job_data(_prune_parser().parse_args(argv), argv))


ROWS = [(recipe, setting) for recipe in reproduce.RECIPES for setting in reproduce.SETTINGS
        if not (recipe in reproduce.UNSTRUCTURED_ONLY and ":" in setting)]  # the rows the table runs


@pytest.mark.parametrize("recipe,setting", ROWS)
def test_every_row_is_a_valid_command(recipe, setting):
    config = job_of(recipe, setting).prune
    assert config.target_sparsity == pytest.approx(float(reproduce.SETTINGS[setting][1]) if ":" not in setting else 0.5)
    name, *pieces = recipe.split("+")
    # The README's rule, written out: at 50% unstructured Wanda + refit, shrink 0.4; at 2:4
    # SparseGPT + refit, shrink 0.25, at 4:8 0.4; above 50% SparseGPT + refit, shrink 0.1, with OWL
    # from 70% unstructured.
    expect: dict[str, object] = {"method": name}
    if name == "default" and setting == "50%":
        expect = {"method": "wanda", "update": "admm", "admm_iterations": 0, "refine": "none", "shrink": 0.4,
                  "allocation": "uniform"}
    elif name == "default":
        expect = {"method": "sparsegpt", "update": "admm", "refine": "none",
                  "shrink": {"2:4": 0.25, "4:8": 0.4}.get(setting, 0.1),
                  "allocation": "owl" if setting == "70%" else "uniform"}
    if "refit" in pieces:
        expect["update"] = "admm"
    if name == "wanda" and "refit" in pieces:
        expect.update(admm_iterations=0, shrink=0.7)  # the pydoc-only best at 50% and 60%
    if "dsnot" in pieces:
        expect["refine"] = "dsnot"
    if "owl" in pieces:
        expect["allocation"] = "owl"
    if name == "wanda" and "admm" in pieces:
        expect["update"] = "admm"
    for key, value in expect.items():
        assert getattr(config, key) == value, (key, recipe, setting)
    assert (config.recover == "blockwise") == ("recover" in pieces or "schedule" in pieces)
    assert bool(config.schedule) == ("schedule" in pieces)


def test_the_refit_rows_are_the_default_at_50_and_60_percent():
    """At 60% the default is SparseGPT + refit at a named method's own shrinkage (0.1); at 50%
    it is Wanda + refit at shrink 0.4, which the wanda+refit row runs at 0.7 (the pydoc-only best)."""
    keys = ("method", "update", "admm_iterations", "refine", "allocation")
    for setting, row_name in (("60%", "sparsegpt+refit"), ("50%", "wanda+refit")):
        default, row = job_of("default", setting).prune, job_of(row_name, setting).prune
        for key in keys:
            assert getattr(row, key) == getattr(default, key), (setting, key)
    assert job_of("default", "60%").prune.shrink == job_of("sparsegpt+refit", "60%").prune.shrink == 0.1
    assert job_of("default", "50%").prune.shrink == 0.4 != job_of("wanda+refit", "50%").prune.shrink
