"""merge: every selected adapted model and the target, merged all at once over the base with mergekit.

The `mergekit` engine runs mergekit's `run_merge` over the apply stage's outputs (the reference); the `fused` engine
computes the adapted tensors on the fly and merges them with mergekit's `merge_tensors` (same result, nothing
written twice). Either way the output gets the target's tokenizer, `mergekit_config.yml`, lineage.json and a card.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.archive.store import verify_adapter
from pipeline.fingerprint import model_fingerprint
from pipeline.merging.config import (
    build_mergekit_config,
    resolve_engine,
    resolve_model_once,
    validate_mergekit_config,
)
from pipeline.models.hub import check_model_reference
from pipeline.recipe import MergeConfig, Recipe, RecipeError
from pipeline.stages.contract import Inputs, Stage, StageRef
from pipeline.stages.selection import (
    adapted_model_dir,
    adapter_dir,
    archive_inputs,
    check_trained_on_base,
    foreign_adapter_files,
    selected_adapters,
)

CONFIG_FILE = "mergekit_config.yml"


def config(recipe: Recipe, item: str) -> dict:
    adapters = selected_adapters(recipe)
    engine = resolve_engine(recipe.merge)
    settings = {
        "merge": recipe.merge.model_dump(),
        "engine": engine,
        "adapters": adapters,
        "base": model_fingerprint(recipe.base_model),
        "target": model_fingerprint(recipe.target_model),
    }
    if engine == "fused":
        settings["apply_dtype"] = recipe.apply.dtype
    foreign = foreign_adapter_files(recipe, adapters)
    if foreign:
        settings["adapter_files"] = foreign
    return settings


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    adapters = selected_adapters(recipe)
    searched = [StageRef("search")] if recipe.search is not None else []
    if resolve_engine(recipe.merge) == "mergekit":
        return [*(StageRef("apply", name) for name in adapters), *searched]
    return [*archive_inputs(recipe, adapters), *searched]


def check(recipe: Recipe, item: str) -> None:
    """The generated mergekit config validated by mergekit itself, on placeholder paths (nothing is loaded)."""
    adapters = selected_adapters(recipe)
    unknown = sorted(set(recipe.merge.models) - set(adapters))
    if unknown:
        raise RecipeError(f"merge.models: {unknown} are not among the merged adapters {adapters}")
    if not adapters:
        raise RecipeError(
            f"merge: no adapter to merge (no finetunes, and none in the archive {recipe.archive_dir} "
            f"trained on {recipe.base_model})"
        )
    check_trained_on_base(recipe, adapters)
    if resolve_engine(recipe.merge) == "fused" and recipe.merge.tokenizer_source:
        raise RecipeError("merge.engine: fused cannot rebuild the vocabulary for tokenizer_source; use mergekit")
    check_model_reference(recipe.base_model, "base_model")
    check_model_reference(recipe.target_model, "target_model")
    placeholders = {name: str(adapted_model_dir(recipe, name).absolute()) for name in adapters}
    validate_mergekit_config(
        build_mergekit_config(
            recipe.merge, placeholders, _reference(recipe.base_model), _reference(recipe.target_model)
        )
    )


def _reference(model: str) -> str:
    return str(Path(model).absolute()) if Path(model).is_dir() else model


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.merging.adapted_model import check_architecture
    from pipeline.merging.output import adopt_target_files, warn_if_vocabulary_changed, write_base_config, write_lineage

    adapters = selected_adapters(recipe)
    engine = resolve_engine(recipe.merge)
    base = resolve_model_once(recipe.base_model, "base_model", recipe.trust_remote_code)
    target = resolve_model_once(recipe.target_model, "target_model", recipe.trust_remote_code)
    archived = {name: adapter_dir(recipe, name) for name in adapters}
    manifests = {name: verify_adapter(path) for name, path in archived.items()}
    target_config = json.loads((target / "config.json").read_text())
    for name, manifest in manifests.items():  # the fused engine checks shapes only
        check_architecture(name, manifest.get("base_config"), target_config, str(target))
    # The mergekit engine reads these; for the fused engine they only name the models in mergekit_config.yml.
    adapted = {name: str(adapted_model_dir(recipe, name).resolve()) for name in adapters}
    settings, searched = chosen_settings(recipe, inputs)
    mergekit_config = build_mergekit_config(settings, adapted, str(base), str(target))
    parsed = validate_mergekit_config(mergekit_config)
    if engine == "mergekit":
        from pipeline.merging.mergekit_engine import run_mergekit

        run_mergekit(
            mergekit_config,
            out,
            device=recipe.merge.device,
            low_cpu_memory=recipe.merge.low_cpu_memory,
            trust_remote_code=recipe.trust_remote_code,
        )
        summary = {}
    else:
        from pipeline.merging.fused import fused_merge

        summary = fused_merge(
            parsed,
            base_dir=base,
            target_dir=target,
            out_dir=out,
            apply_dtype=recipe.apply.dtype,
            adapters={adapted[name]: archived[name] for name in adapters},
            memory_budget=int(recipe.merge.memory_budget * 1024**3),
            device=recipe.merge.device,
            trust_remote_code=recipe.trust_remote_code,
        )
        over_base = parsed.base_model is not None and settings.base_model == "base"
        write_base_config(base if over_base else target, out, recipe.merge.dtype)
    adopt_target_files(out, target, keep_tokenizer=bool(recipe.merge.tokenizer_source))
    warning = warn_if_vocabulary_changed(out, target) if recipe.merge.tokenizer_source else None
    (out / CONFIG_FILE).write_text(yaml.safe_dump(mergekit_config, sort_keys=False))
    write_lineage(out, {**_lineage(recipe, engine, base, target, manifests), "search": searched}, mergekit_config)
    return {**summary, "engine": engine, "adapters": adapters, **({"warning": warning} if warning else {})}


def chosen_settings(recipe: Recipe, inputs: Inputs) -> tuple[MergeConfig, dict | None]:
    """The recipe's merge settings, or, when the search ran, them updated with the chosen trial's (and what the
    lineage says about that choice)."""
    if recipe.search is None:
        return recipe.merge, None
    search_dir = inputs.path("search")
    chosen = yaml.safe_load((search_dir / "chosen.yml").read_text())
    settings = MergeConfig.model_validate({**recipe.merge.model_dump(), **chosen["merge"]})
    return settings, {
        "chosen_trial": chosen["trial"],
        "objective": chosen["objective"],
        "learned": chosen["learned"],
        "kept": chosen["kept"],
        "leaderboard": str(search_dir / "leaderboard.md"),
        "why": "the highest mean learned fraction among trials that kept every retention set within "
        f"{recipe.search.retention_tolerance:g} of the target",
    }


def _lineage(recipe: Recipe, engine: str, base: Path, target: Path, manifests: dict[str, dict]) -> dict:
    adapters = []
    for name, manifest in manifests.items():
        train = manifest.get("train") or {}
        lora = train.get("lora") or {}
        adapters.append(
            {
                "name": name,
                "dataset": (manifest.get("dataset") or {}).get("path"),
                "sha256": manifest["files"].get("adapter_model.safetensors"),
                "files": manifest["files"],
                "train": ", ".join(
                    f"{k}={v}"
                    for k, v in [
                        ("r", lora.get("r")),
                        ("alpha", lora.get("alpha")),
                        ("lr", train.get("learning_rate")),
                        ("epochs", train.get("epochs")),
                        ("max_steps", train.get("max_steps")),
                    ]
                    if v is not None
                ),
                "metrics": manifest.get("metrics"),
                "recipe": manifest.get("recipe"),
            }
        )
    return {
        "name": recipe.name,
        "engine": engine,
        "base": recipe.base_model,
        "base_path": str(base),
        "target": recipe.target_model,
        "target_path": str(target),
        "adapters": adapters,
    }


STAGE = Stage(name="merge", config=config, depends_on=depends_on, check=check, run=run)
