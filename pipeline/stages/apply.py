"""apply: each adapter the merge selects, added to the target tensor by tensor into apply/<adapter>/.

Needed by the mergekit engine (its inputs are these models) or when `apply.save` asks for them; the fused engine
computes the same tensors on the fly, so with it and `save: false` this stage has nothing to do.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.archive.store import verify_adapter
from pipeline.fingerprint import model_fingerprint
from pipeline.models.hub import check_model_reference, resolve_model
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages.contract import Inputs, Stage, StageRef
from pipeline.stages.selection import (
    adapted_model_dir,
    adapter_dir,
    archive_inputs,
    check_trained_on_base,
    foreign_adapter_files,
    is_own_finetune,
    saves_adapted_models,
    selected_adapters,
)


def items(recipe: Recipe) -> list[str]:
    return selected_adapters(recipe) if saves_adapted_models(recipe) else []


def config(recipe: Recipe, item: str) -> dict:
    settings = {"target": model_fingerprint(recipe.target_model), "apply": recipe.apply.model_dump(exclude={"save"})}
    foreign = foreign_adapter_files(recipe, [item])
    if foreign:
        settings["adapter_files"] = foreign[item]
    return settings


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    return archive_inputs(recipe, [item])


def check(recipe: Recipe, item: str) -> None:
    """The target reference, and for adapters already archived by another recipe, that they were trained on this
    base and their config is a LoRA that can be applied to another model (reads only the JSON files)."""
    from pipeline.models.lora import read_adapter_config

    check_model_reference(recipe.target_model, "target_model")
    if not is_own_finetune(recipe, item):
        check_trained_on_base(recipe, [item])
        try:
            read_adapter_config(adapter_dir(recipe, item))
        except ValueError as error:
            raise RecipeError(f"merge.adapters: {error}") from None


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.merging.adapted_model import apply_adapter

    adapter = adapter_dir(recipe, item)
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
    return {**summary, "adapter": str(adapter), "target": str(target)}


STAGE = Stage(
    name="apply", items=items, output_path=adapted_model_dir, config=config, depends_on=depends_on, check=check, run=run
)
