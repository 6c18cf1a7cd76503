"""Which adapters a recipe merges, and whether this recipe or another one archived each: decided here once, for
the apply, search, merge and evaluate stages alike."""

from __future__ import annotations

from pathlib import Path

from pipeline.archive.store import archived_adapters, read_manifest
from pipeline.merging.config import resolve_engine
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages.contract import StageRef


def adapter_dir(recipe: Recipe, name: str) -> Path:
    """An adapter's directory in the recipe's archive: the archive stage's output for the recipe's own fine-tunes,
    the entry another recipe (or `pipeline.archive add`) wrote for the others."""
    return Path(recipe.archive_dir) / name


def adapted_model_dir(recipe: Recipe, name: str) -> Path:
    """Where the apply stage writes an adapted model, which the mergekit engine reads."""
    return Path(recipe.output_dir) / "apply" / name


def is_own_finetune(recipe: Recipe, name: str) -> bool:
    return any(finetune.name == name for finetune in recipe.finetunes)


def selected_adapters(recipe: Recipe) -> list[str]:
    """The adapters the merge uses: with `merge.adapters: all`, the recipe's own fine-tunes (in recipe order) and then
    every archived adapter trained on the same base; with a list, those names, each of which must be one of the
    recipe's fine-tunes or already archived."""
    own = [finetune.name for finetune in recipe.finetunes]
    archived = archived_adapters(Path(recipe.archive_dir))
    if recipe.merge.adapters == "all":
        same_base = [
            name
            for name, manifest in archived.items()
            if manifest.get("base_model") == recipe.base_model and name not in own
        ]
        return own + same_base
    unknown = [name for name in recipe.merge.adapters if name not in own and name not in archived]
    if unknown:
        holds = ", ".join(archived) or "nothing yet"
        raise RecipeError(
            f"merge.adapters: {unknown} are neither fine-tunes of this recipe nor in the archive "
            f"{recipe.archive_dir} (it holds: {holds})"
        )
    return list(recipe.merge.adapters)


def saves_adapted_models(recipe: Recipe) -> bool:
    """Whether the apply stage writes the adapted models: the mergekit engine reads them, `apply.save` keeps them."""
    return recipe.apply.save or resolve_engine(recipe.merge) == "mergekit"


def archive_inputs(recipe: Recipe, names: list[str]) -> list[StageRef]:
    """The archive steps of this recipe that write these adapters; those of other recipes are no step of this one."""
    return [StageRef("archive", name) for name in names if is_own_finetune(recipe, name)]


def foreign_adapter_files(recipe: Recipe, names: list[str]) -> dict[str, dict[str, str]]:
    """name → sha256 of each file, for the adapters another recipe archived: no step of this recipe fingerprints
    them, so a stage that reads them puts their identity into its config."""
    return {
        name: read_manifest(adapter_dir(recipe, name))["files"] for name in names if not is_own_finetune(recipe, name)
    }


def check_trained_on_base(recipe: Recipe, names: list[str]) -> None:
    """Refuse archived adapters (named in `merge.adapters`) that were trained on another base than the recipe's: the
    merge takes the recipe's base as the reference its task vectors are measured from, and same-shaped models (Qwen2
    and Qwen2.5) would pass every shape check. Compared as `merge.adapters: all` selects: by the base as named."""
    other = {
        name: read_manifest(adapter_dir(recipe, name)).get("base_model")
        for name in names
        if not is_own_finetune(recipe, name)
    }
    other = {name: base for name, base in other.items() if base != recipe.base_model}
    if other:
        listing = ", ".join(f"{name} (base {base})" for name, base in other.items())
        raise RecipeError(
            f"merge.adapters: {listing} were not trained on this recipe's base_model "
            f"{recipe.base_model}. Leave them out, or archive them for this base (`python -m "
            "pipeline.archive add ... --base`) if it is the same model under another name."
        )
