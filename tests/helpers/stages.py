"""Running one stage in the test's process, as the runner would but without it (no skipping, no rename)."""

from __future__ import annotations

from pathlib import Path

from helpers.archive import ADAPTERS
from helpers.recipes import merge_recipe
from pipeline.stages import Inputs, Stage, StageRef, apply, merge, prepare
from pipeline.stages.selection import adapter_set


def step_inputs(recipe, paths: dict | None = None) -> Inputs:
    """What the runner hands a step: `paths` (its declared inputs' outputs) and the recipe's adapter set."""
    return Inputs(paths or {}, adapter_set(recipe))


def run_stage(stage: Stage, recipe, item) -> Path:
    out = stage.output_path(recipe, item)
    out.mkdir(parents=True, exist_ok=True)
    stage.check(recipe, item)
    stage.run(recipe, item, out, step_inputs(recipe))
    return out


def applied_inputs(recipe) -> Inputs:
    """The apply outputs of every archived adapter (the `applied` fixture writes them)."""
    return step_inputs(recipe, {StageRef("apply", name): apply.STAGE.output_path(recipe, name) for name in ADAPTERS})


def merge_with(tiny_models, archive, applied, tmp_path, engine, **settings) -> Path:
    """Run the merge stage into its own directory, reading the shared apply outputs."""
    recipe = merge_recipe(tiny_models, archive, applied, engine=engine, **settings)
    out = tmp_path / f"merge-{engine}"
    out.mkdir(parents=True)
    merge.check(recipe, "")
    merge.run(recipe, "", out, applied_inputs(recipe))
    return out


def run_prepare(recipe, tmp_path, name="out"):
    """The prepare stage on the recipe's fine-tune `ft` into tmp_path/name: (that directory, the stage's summary)."""
    prepare.check(recipe, "ft")
    out = tmp_path / name
    out.mkdir()
    summary = prepare.run(recipe, "ft", out, Inputs())
    return out, summary
