"""apply: each adapter the merge selects, added to the target tensor by tensor into apply/<adapter>/.

Needed by the mergekit engine (its inputs are these models) or when `apply.save` asks for them; the fused engine
computes the same tensors on the fly, so with it and `save: false` this stage has nothing to do.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import console
from pipeline.archive.store import verify_adapter
from pipeline.fingerprint import model_fingerprint
from pipeline.models.hub import check_model_reference, resolve_model
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef, problems_at
from pipeline.stages.selection import (
    adapted_model_dir,
    adapter_set,
    check_trained_on_base,
    saves_adapted_models,
    selected_adapters,
)


def items(recipe: Recipe) -> list[str]:
    return selected_adapters(recipe) if saves_adapted_models(recipe) else []


def config(recipe: Recipe, item: str) -> dict:
    settings = {"target": model_fingerprint(recipe.target_model), "apply": result_settings(recipe.apply)}
    foreign = adapter_set(recipe).foreign_files([item])
    if foreign:
        settings["adapter_files"] = foreign[item]
    return settings


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    return adapter_set(recipe).archive_steps([item])


def check(recipe: Recipe, item: str) -> None:
    """The target reference, and for adapters already archived by another recipe, that they were trained on this
    base and their config is a LoRA that can be applied to another model (reads only the JSON files)."""
    from pipeline.models.lora import read_adapter_config

    with problems_at():
        check_model_reference(recipe.target_model, "target_model")
    adapter = adapter_set(recipe)[item]
    if not adapter.own:
        check_trained_on_base(recipe, [item])
        try:
            read_adapter_config(adapter.directory)
        except ValueError as error:
            raise RecipeError(f"merge.adapters: {error}") from None


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.merging.adapted_model import apply_adapter

    adapter = inputs.adapter_dir(item)
    manifest = verify_adapter(adapter)
    target = resolve_model(recipe.target_model, "target_model", trust_remote_code=recipe.trust_remote_code)
    summary = apply_adapter(
        adapter,
        target,
        out,
        dtype=recipe.apply.dtype,
        device=recipe.apply.device,
        base_config=manifest.get("base_config"),
    )
    if "cast" in summary:
        console.notice(f"apply {item}: {summary['cast']} (apply.dtype: {recipe.apply.dtype}; auto keeps the target's)")
    return {**summary, "adapter": str(adapter), "target": str(target)}


STAGE = Stage(
    name="apply", items=items, output_path=adapted_model_dir, config=config, depends_on=depends_on, check=check, run=run
)
