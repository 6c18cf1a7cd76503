"""apply: each adapter the merge selects, added to the target tensor by tensor into apply/<adapter>/.

Needed by the mergekit engine (its inputs are these models) or when `apply.save` asks for them; the fused engine
computes the same tensors on the fly, so with it and `save: false` this stage has nothing to do.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.archive.store import (
    adapter_dir,
    check_trained_on_base,
    read_manifest,
    selected_adapters,
    verify_adapter,
)
from pipeline.fingerprint import model_fingerprint
from pipeline.merging.config import resolve_engine
from pipeline.models.hub import check_model_reference, resolve_model
from pipeline.recipe import Recipe, RecipeError

NAME = "apply"
RESUMABLE = False
WRITE_ONCE = False


def items(recipe: Recipe) -> list[str]:
    if recipe.apply.save or resolve_engine(recipe) == "mergekit":
        return selected_adapters(recipe)
    return []


def output_path(recipe: Recipe, item: str) -> Path:
    return Path(recipe.output_dir) / "apply" / item


def is_own_finetune(recipe: Recipe, item: str) -> bool:
    return any(finetune.name == item for finetune in recipe.finetunes)


def config(recipe: Recipe, item: str) -> dict:
    settings = {"target": model_fingerprint(recipe.target_model),
                "apply": recipe.apply.model_dump(exclude={"save"})}
    if not is_own_finetune(recipe, item):
        settings["adapter_files"] = read_manifest(adapter_dir(recipe, item))["files"]
    return settings


def depends_on(recipe: Recipe, item: str) -> list[tuple[str, str]]:
    return [("archive", item)] if is_own_finetune(recipe, item) else []


def check(recipe: Recipe, item: str) -> None:
    """The target reference, and for adapters already archived by another recipe, that they were trained on this
    base and their config is a LoRA that can be applied to another model (reads only the JSON files)."""
    from pipeline.models.lora import read_adapter_config  # imports torch: keep --status and --dry-run fast

    check_model_reference(recipe.target_model, "target_model")
    if not is_own_finetune(recipe, item):
        check_trained_on_base(recipe, [item])
        try:
            read_adapter_config(adapter_dir(recipe, item))
        except ValueError as error:
            raise RecipeError(f"merge.adapters: {error}") from None


def run(recipe: Recipe, item: str, out: Path, inputs: dict) -> dict:
    from pipeline.merging.adapted_model import apply_adapter

    adapter = Path(inputs.get(("archive", item)) or adapter_dir(recipe, item))
    manifest = verify_adapter(adapter)
    target = resolve_model(recipe.target_model, "target_model", trust_remote_code=recipe.trust_remote_code)
    summary = apply_adapter(adapter, target, out, dtype=recipe.apply.dtype, device=recipe.apply.device,
                            base_config=manifest.get("base_config"))
    return {**summary, "adapter": str(adapter), "target": str(target)}
