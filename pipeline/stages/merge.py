"""merge: every selected adapted model and the target, merged all at once over the base with mergekit.

A merge is planned (the settings, after the search's choice when a search ran; the models; the adapters), run by one
engine of `ENGINES` — `fused` (the adapted tensors computed on the fly and merged with mergekit's `merge_tensors`),
`mergekit` (mergekit's `run_merge` over the apply stage's outputs, the reference; the two are equal) or `moe`
(mergekit-moe) — and finished the same way: `mergekit_config.yml`, lineage.json and a card beside the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import console
from pipeline.fingerprint import model_fingerprint
from pipeline.merging.config import (
    build_mergekit_config,
    mergekit_only_keys,
    resolve_engine,
    resolve_model_once,
    slice_adapters,
    validate_mergekit_config,
)
from pipeline.merging.moe import needs_prompts
from pipeline.models.hub import check_model_reference, local_config
from pipeline.recipe import MergeConfig, Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef, problems_at
from pipeline.stages.selection import (
    adapted_model_dir,
    adapted_model_names,
    adapter_set,
    check_trained_on_base,
    is_own_finetune,
    selected_adapters,
)


def merged_adapters(recipe: Recipe, adapters: list[str]) -> list[str]:
    """The adapters this merge reads of the selected `adapters`: with `merge.slices` the ones its sources name, else
    all of them."""
    if recipe.merge.slices:
        named = slice_adapters(recipe.merge)
        return [name for name in adapters if name in named]
    return adapters


def moe_prompt_sources(recipe: Recipe, adapters: list[str]) -> list[str]:
    """The experts whose prompts are sampled from this run's prepared data (none given in the recipe)."""
    moe = recipe.merge.moe
    if moe is None or not needs_prompts(moe):
        return []
    given = {name for name, expert in moe.experts.items() if expert.positive_prompts}
    return [name for name in adapters if name not in given and is_own_finetune(recipe, name)]


def config(recipe: Recipe, item: str) -> dict:
    adapters = merged_adapters(recipe, selected_adapters(recipe))
    engine = resolve_engine(recipe.merge)
    settings = {
        "merge": result_settings(recipe.merge),
        "engine": engine,
        "adapters": adapters,
        "base": model_fingerprint(recipe.base_model),
        "target": model_fingerprint(recipe.target_model),
    }
    if engine == "fused":
        settings["apply_dtype"] = recipe.apply.dtype
    foreign = adapter_set(recipe).foreign_files(adapters)
    if foreign:
        settings["adapter_files"] = foreign
    return settings


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    """The archived adapters (every engine reads their manifests for the lineage), the adapted models the mergekit
    engine reads, the search's choice, and the prepared data a MoE samples its prompts from."""
    adapters = merged_adapters(recipe, selected_adapters(recipe))
    searched = [StageRef("search")] if recipe.search is not None else []
    prepared = [StageRef("prepare", name) for name in moe_prompt_sources(recipe, adapters)]
    applied = [StageRef("apply", name) for name in adapters] if resolve_engine(recipe.merge) == "mergekit" else []
    return [*prepared, *adapter_set(recipe).archive_steps(adapters), *applied, *searched]


def check(recipe: Recipe, item: str) -> None:
    """The generated mergekit config validated by mergekit itself, on placeholder paths (nothing is loaded)."""
    adapters = selected_adapters(recipe)
    unknown = sorted(set(recipe.merge.models) - set(adapters))
    if unknown:
        raise RecipeError(f"merge.models: {unknown} are not among the merged adapters {adapters}")
    _check_named_models(recipe, adapters)
    adapters = merged_adapters(recipe, adapters)
    if not adapters:
        raise RecipeError(
            f"merge: no adapter to merge (no finetunes, and none in the archive {recipe.archive_dir} "
            f"trained on {recipe.base_model})"
        )
    check_trained_on_base(recipe, adapters)
    needs_mergekit = mergekit_only_keys(recipe.merge)
    if resolve_engine(recipe.merge) == "fused" and needs_mergekit:
        raise RecipeError(
            "merge.engine: fused cannot rebuild the vocabulary, slice layers or build experts; "
            f"{', '.join(f'merge.{key}' for key in needs_mergekit)} need mergekit: set merge.engine: mergekit "
            "(or auto)"
        )
    with problems_at("merge"):
        check_model_reference(recipe.base_model, "base_model")
        check_model_reference(recipe.target_model, "target_model")
        target_config = local_config(recipe.target_model)
        if recipe.merge.moe is not None:
            from pipeline.merging.moe import check_moe

            if recipe.merge.tokenizer_source or recipe.merge.tokenizer:
                raise RecipeError(
                    "merge.moe: mergekit-moe keeps the target's tokenizer; remove merge.tokenizer(_source)"
                )
            own = {name for name in adapters if is_own_finetune(recipe, name)}
            check_moe(recipe.merge, adapters, own, target_config.get("model_type") if target_config else None)
            return
        placeholders = {name: str(adapted_model_dir(recipe, name).absolute()) for name in adapters}
        validate_mergekit_config(
            build_mergekit_config(
                recipe.merge, placeholders, _reference(recipe.base_model), _reference(recipe.target_model)
            ),
            target_config.get("num_hidden_layers") if target_config else None,
        )


def _check_named_models(recipe: Recipe, adapters: list[str]) -> None:
    """Every model a slice source or the tokenizer block names: base, target, a merged adapter or a model dir."""
    known = ["base", "target", *adapters]
    merge = recipe.merge
    named = [
        (f"merge.slices.{i}.sources.{j}.model", source.model)
        for i, piece in enumerate(merge.slices or [])
        for j, source in enumerate(piece.sources)
    ]
    if merge.tokenizer is not None:
        if merge.tokenizer.source != "union":
            named.append(("merge.tokenizer.source", merge.tokenizer.source))
        for token, setting in merge.tokenizer.tokens.items():
            source = setting.get("source")
            model = source.get("model") if isinstance(source, dict) else source
            if isinstance(model, str):
                named.append((f"merge.tokenizer.tokens.{token}.source", model))
    for key, model in named:
        if model in known or (not key.startswith("merge.slices") and Path(model).is_dir()):
            continue
        raise RecipeError(f"{key}: {model!r} is not base, target or a merged adapter (known: {', '.join(known)})")


def _reference(model: str) -> str:
    return str(Path(model).absolute()) if Path(model).is_dir() else model


@dataclass(frozen=True)
class MergePlan:
    """What one merge reads and how: the settings (the search's choice applied), the models, each adapter's archived
    directory and manifest, the paths that name the adapted models in the mergekit config, and for a MoE its
    experts' prompts."""

    engine: str
    settings: MergeConfig
    base: Path
    target: Path
    target_config: dict
    archived: dict[str, Path]
    manifests: dict[str, dict]
    adapted: dict[str, str]
    searched: dict | None
    prompts: dict[str, list[str]] = field(default_factory=dict)


def plan(recipe: Recipe, inputs: Inputs) -> MergePlan:
    from pipeline.archive.store import verify_adapter
    from pipeline.merging.adapted_model import check_architecture

    adapters = merged_adapters(recipe, inputs.adapters.names)
    base = resolve_model_once(recipe.base_model, "base_model", recipe.trust_remote_code)
    target = resolve_model_once(recipe.target_model, "target_model", recipe.trust_remote_code)
    archived = {name: inputs.adapter_dir(name) for name in adapters}
    manifests = {name: verify_adapter(path) for name, path in archived.items()}
    target_config = json.loads((target / "config.json").read_text())
    for name, manifest in manifests.items():  # the fused engine checks shapes only
        check_architecture(name, manifest.get("base_config"), target_config, str(target))
    settings, searched = chosen_settings(recipe, inputs)
    engine = "moe" if settings.moe is not None else resolve_engine(recipe.merge)
    return MergePlan(
        engine=engine,
        settings=settings,
        base=base,
        target=target,
        target_config=target_config,
        archived=archived,
        manifests=manifests,
        adapted=_adapted_models(recipe, engine, adapters, inputs),
        searched=searched,
        prompts=_moe_prompts(recipe, settings, adapters, target, inputs) if engine == "moe" else {},
    )


def _adapted_models(recipe: Recipe, engine: str, adapters: list[str], inputs: Inputs) -> dict[str, str]:
    """The path naming each adapted model in the mergekit config: the apply outputs the mergekit engine reads; for
    the fused engine, which computes them on the fly, where apply would write them (nothing need be there)."""
    if engine == "fused":
        return adapted_model_names(recipe, adapters)
    return {name: str(inputs.path("apply", name).resolve()) for name in adapters}


def chosen_settings(recipe: Recipe, inputs: Inputs) -> tuple[MergeConfig, dict | None]:
    """The recipe's merge settings, or, when the search ran, them updated with the chosen trial's (and what the
    lineage says about that choice)."""
    if recipe.search is None:
        return recipe.merge, None
    from pipeline.search.leaderboard import LEADERBOARD_MD, SearchChoice

    search_dir = inputs.path("search")
    choice = SearchChoice.read(search_dir)
    settings = MergeConfig.model_validate({**recipe.merge.model_dump(), **choice.merge})
    return settings, {
        "chosen_trial": choice.trial,
        "objective": choice.objective,
        "learned": choice.learned,
        "kept": choice.kept,
        "leaderboard": str(search_dir / LEADERBOARD_MD),
        "why": choice.why,
    }


@dataclass(frozen=True)
class EngineOutput:
    """What an engine wrote besides the weights: the configuration it ran, and its own summary figures."""

    mergekit_config: dict
    summary: dict


def _fused(recipe: Recipe, merge: MergePlan, out: Path) -> EngineOutput:
    from pipeline.merging.fused import FusedOptions, FusedSources, fused_merge
    from pipeline.merging.output import adopt_target_files, write_base_config

    mergekit_config = build_mergekit_config(merge.settings, merge.adapted, str(merge.base), str(merge.target))
    parsed = validate_mergekit_config(mergekit_config, merge.target_config["num_hidden_layers"])
    sources = FusedSources(merge.base, merge.target, merge.archived, merge.adapted, recipe.apply.dtype)
    budget = int(recipe.merge.memory_budget * 1024**3)
    options = FusedOptions(recipe.merge.device, recipe.trust_remote_code, memory_budget=budget)
    summary = fused_merge(parsed, sources, out, options)
    over_base = parsed.base_model is not None and merge.settings.base_model == "base"
    write_base_config(merge.base if over_base else merge.target, out, merge.settings.dtype)
    adopt_target_files(out, merge.target, keep_tokenizer=False)
    return EngineOutput(mergekit_config, summary)


def _mergekit(recipe: Recipe, merge: MergePlan, out: Path) -> EngineOutput:
    from pipeline.merging.mergekit_engine import run_mergekit
    from pipeline.merging.output import adopt_target_files, vocabulary_change

    mergekit_config = build_mergekit_config(merge.settings, merge.adapted, str(merge.base), str(merge.target))
    validate_mergekit_config(mergekit_config, merge.target_config["num_hidden_layers"])
    run_mergekit(
        mergekit_config,
        out,
        device=recipe.merge.device,
        low_cpu_memory=recipe.merge.low_cpu_memory,
        trust_remote_code=recipe.trust_remote_code,
    )
    rebuilt = bool(merge.settings.tokenizer_source or merge.settings.tokenizer)  # mergekit built the vocabulary
    adopt_target_files(out, merge.target, keep_tokenizer=rebuilt)
    changed = vocabulary_change(out, merge.target) if rebuilt else None
    if changed:
        console.notice(f"merge: {changed}")
    return EngineOutput(mergekit_config, {"warning": changed} if changed else {})


def _moe(recipe: Recipe, merge: MergePlan, out: Path) -> EngineOutput:
    from pipeline.merging.adapted_model import resolve_device
    from pipeline.merging.moe import (
        TARGET,
        build_moe_config,
        expert_names,
        output_architecture,
        run_moe,
        write_moe_config,
    )
    from pipeline.merging.output import adopt_target_tokenizer

    experts = expert_names(merge.settings, list(merge.adapted))
    mergekit_config = build_moe_config(
        merge.settings.moe,
        target=str(merge.target),
        experts={name: str(merge.target) if name == TARGET else merge.adapted[name] for name in experts},
        prompts=merge.prompts,
        architecture=output_architecture(merge.target_config["model_type"]),
        dtype=merge.settings.dtype,
    )
    run_moe(
        mergekit_config,
        out,
        device=str(resolve_device(recipe.merge.device)),
        seed=merge.settings.moe.seed,
        trust_remote_code=recipe.trust_remote_code,
    )
    adopt_target_tokenizer(out, merge.target)
    write_moe_config(out, merge.target)
    return EngineOutput(mergekit_config, {"experts": len(mergekit_config["experts"])})


ENGINES: dict[str, Callable[[Recipe, MergePlan, Path], EngineOutput]] = {
    "fused": _fused,
    "mergekit": _mergekit,
    "moe": _moe,
}


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.merging.output import write_lineage, write_merge_config

    merge = plan(recipe, inputs)
    output = ENGINES[merge.engine](recipe, merge, out)
    engine = "mergekit-moe" if merge.engine == "moe" else merge.engine
    write_merge_config(out, output.mergekit_config)
    lineage = {**_lineage(recipe, engine, merge), "search": merge.searched}
    write_lineage(out, lineage, output.mergekit_config)
    return {**output.summary, "engine": engine, "adapters": list(merge.archived)}


def _moe_prompts(recipe: Recipe, merge: MergeConfig, adapters: list[str], target: Path, inputs: Inputs) -> dict:
    """Each expert's positive prompts: the recipe's, else samples of its fine-tune's prepared train split."""
    from transformers import AutoTokenizer

    from pipeline.merging.moe import expert_names, sample_prompts

    moe = merge.moe
    prompts = {name: list(e.positive_prompts) for name, e in moe.experts.items() if e.positive_prompts}
    sampled = moe_prompt_sources(recipe, adapters)
    if sampled:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=recipe.trust_remote_code)
        for name in sampled:
            train = inputs.path("prepare", name) / "train"
            prompts[name] = sample_prompts(train, tokenizer, moe.prompts_per_expert, moe.prompt_tokens, moe.seed)
    return {name: prompts.get(name, []) for name in expert_names(merge, adapters)}


def _lineage(recipe: Recipe, engine: str, merge: MergePlan) -> dict:
    adapters = []
    for name, manifest in merge.manifests.items():
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
        "base_path": str(merge.base),
        "target": recipe.target_model,
        "target_path": str(merge.target),
        "adapters": adapters,
    }


STAGE = Stage(name="merge", config=config, depends_on=depends_on, check=check, run=run)
