"""scripts/reproduce.py: every row's command is a valid llmprune command that runs the recipe
its name says (the grid itself is a benchmark, run by hand: minutes per row)."""

import importlib.util
from pathlib import Path

import pytest

from llmprune.cli.commands import _prune_parser, job_data
from llmprune.jobs.pipeline import generated_count
from llmprune.jobs.recipe import job_from_dict
from llmprune.jobs.stores import MemoryStore

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
    job = job_of(recipe, setting)
    config = job.prune
    # Rows that name a method generate no windows when run; "default" rows a quarter of them.
    assert job.calibration.generated == (0 if recipe == "default+real" else None)
    own = recipe.startswith("default") and recipe != "default+real"
    assert generated_count(job, MemoryStore(job)) == (8 if own else 0)  # what the run resolves it to
    assert config.target_sparsity == pytest.approx(float(reproduce.SETTINGS[setting][1]) if ":" not in setting else 0.5)
    name, *pieces = recipe.split("+")
    # The README's rule, written out: unstructured RIA + refit, shrink 0.4 at 50% and 0.1 at 60%;
    # from 70% SparseGPT + OWL + refit, shrink 0.1; N:M SparseGPT + refit, 0.1 at 2:4, 0.25 at 4:8.
    expect: dict[str, object] = {"method": name}
    if name == "default" and setting in ("50%", "60%"):
        expect = {"method": "ria", "update": "admm", "admm_iterations": 0, "refine": "none",
                  "shrink": 0.4 if setting == "50%" else 0.1, "allocation": "uniform",
                  "cg_iterations": 4}
    elif name == "default":
        expect = {"method": "sparsegpt", "update": "admm", "refine": "none",
                  "shrink": {"2:4": 0.1, "4:8": 0.25}.get(setting, 0.1),
                  "allocation": "owl" if setting == "70%" else "uniform", "cg_iterations": 4}
    else:
        expect["cg_iterations"] = 10  # a named method's refit runs to the least-squares answer
    if "refit" in pieces:
        expect["update"] = "admm"
    if name == "wanda" and "refit" in pieces:
        expect.update(admm_iterations=0, shrink=0.7)  # the pydoc-only best at 50% and 60%
    if name == "ria" and "refit" in pieces:
        expect.update(admm_iterations=0, shrink=0.1)
    if "dsnot" in pieces:
        expect["refine"] = "dsnot"
    if "owl" in pieces:
        expect["allocation"] = "owl"
    if "sensitivity" in pieces:
        expect["allocation"] = "sensitivity"
        assert config.sensitivity is not None and Path(config.sensitivity).is_file()
    if name == "wanda" and "admm" in pieces:
        expect["update"] = "admm"
    for key, value in expect.items():
        assert getattr(config, key) == value, (key, recipe, setting)
    # The default pulls its refit toward the dense model, unless recovery does that itself.
    pulled = name == "default" and not {"notarget", "recover", "schedule"} & set(pieces)
    assert config.model_target == (0.3 if pulled else 0.0), (recipe, setting)
    assert config.pass_dtype == ("auto" if name == "default" and "float32" not in pieces else "float32")
    assert (config.recover == "blockwise") == ("recover" in pieces or "schedule" in pieces)
    assert bool(config.schedule) == ("schedule" in pieces)


def test_the_ria_refit_row_differs_from_the_default_in_refit_steps_and_at_50_percent_in_shrinkage():
    """The default stops its refit after 4 conjugate-gradient steps where the named RIA + refit
    runs 10; at 60% that is all (both shrink by a named method's 0.1), at 50% the default also
    shrinks by 0.4 (and, when run, the default adds its generated calibration windows, checked
    above)."""
    keys = ("method", "update", "admm_iterations", "refine", "allocation")
    for setting in ("60%", "50%"):
        default, row = job_of("default", setting).prune, job_of("ria+refit", setting).prune
        for key in keys:
            assert getattr(row, key) == getattr(default, key), (setting, key)
    assert job_of("default", "60%").prune.shrink == job_of("ria+refit", "60%").prune.shrink == 0.1
    assert job_of("default", "50%").prune.shrink == 0.4 != job_of("ria+refit", "50%").prune.shrink
    for setting in ("50%", "60%"):
        assert job_of("default", setting).prune.cg_iterations == 4 != job_of("ria+refit", setting).prune.cg_iterations


def test_the_table_counts_the_sampling_in_the_defaults_time():
    rows = [{"recipe": "sparsegpt", "setting": "2:4", "calib": "pydoc", "ppl": 155.49, "prune_s": 80.0},
            {"recipe": "default", "setting": "2:4", "calib": "pydoc", "ppl": 108.84, "prune_s": 90.0,
             "generate_s": 30.0}]
    text = reproduce.table(rows, ["2:4"])
    assert "| default | pydoc | 108.84 (90 + 30 s, 0.70x) |" in text
    assert "| sparsegpt | pydoc | 155.49 (80 s, 1.00x) |" in text
    assert text.endswith("| default time / sparsegpt time | pydoc | 1.50x |")  # (90 + 30) / 80
