"""evaluate: base, target, each adapter on the base (trained) and on the target (adapted), and the merged model, scored
on every fine-tune's held-out split (what the merge learned, and how much of each LoRA transfers to the target) and on
the retention sets (what it kept); report.json, report.md and report.png."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.archive.store import verify_adapter
from pipeline.data import templates
from pipeline.data.loading import check_dataset_path
from pipeline.fingerprint import content_fingerprint, hash_json, model_fingerprint
from pipeline.models.hub import check_model_reference, resolve_model
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef, problems_at
from pipeline.stages.selection import adapted_model_names, adapter_set, saves_adapted_models, selected_adapters

if TYPE_CHECKING:
    from pipeline.evaluation.models import ModelSpec


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.evaluate.enabled else []


def _adapted(recipe: Recipe, adapters: list[str]) -> list[str]:
    """The adapters of the plan scored on the target (adapted), as `evaluate.models` asks."""
    return adapters if "adapted" in recipe.evaluate.models else []


def _trained(recipe: Recipe, adapters: list[str]) -> list[str]:
    """The adapters scored on the model they were trained on (base + LoRA), the yardstick of their transfer."""
    return adapters if "trained" in recipe.evaluate.models else []


def retention_identity(recipe: Recipe) -> dict:
    from pipeline.evaluation.identity import retention_identity as identity

    return identity(
        recipe.evaluate.retention,
        chat_template=recipe.chat_template,
        base_model=recipe.base_model,
        target_model=recipe.target_model,
        max_length=recipe.train.max_seq_length,
    )


def config(recipe: Recipe, item: str) -> dict:
    """The evaluate block, the models' identities, and the retention sets' identity."""
    settings = {
        "evaluate": result_settings(recipe.evaluate),
        "base": model_fingerprint(recipe.base_model),
        "target": model_fingerprint(recipe.target_model),
        "trust_remote_code": recipe.trust_remote_code,
        "adapters": _adapted(recipe, selected_adapters(recipe)),
        "trained": _trained(recipe, selected_adapters(recipe)),
    }
    if recipe.evaluate.retention:
        settings["retention"] = retention_identity(recipe)
    if recipe.evaluate.lm_eval.include_path is not None:
        settings["lm_eval_tasks"] = content_fingerprint(recipe.evaluate.lm_eval.include_path)
    if (settings["adapters"] and not saves_adapted_models(recipe)) or settings["trained"]:
        settings["apply_dtype"] = recipe.apply.dtype  # a model computed as weights + LoRA is loaded in it
    foreign = adapter_set(recipe).foreign_files(list(dict.fromkeys([*settings["adapters"], *settings["trained"]])))
    if foreign:
        settings["adapter_files"] = foreign
    return settings


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    dependencies = [StageRef("merge")] if "merged" in recipe.evaluate.models else []
    if "merged" in recipe.evaluate.models and recipe.search is not None:
        dependencies.append(StageRef("search"))  # the published configuration is scored beside the chosen one
    dependencies += [StageRef("prepare", finetune.name) for finetune in recipe.finetunes]
    selected = selected_adapters(recipe)
    adapted = _adapted(recipe, selected)
    if saves_adapted_models(recipe):
        dependencies += [StageRef("apply", name) for name in adapted]
    # The archived adapters: a trained (and an unsaved adapted) model is computed from one; a merge's identity
    # holds their files.
    read = selected if "merged" in recipe.evaluate.models else [*adapted, *_trained(recipe, selected)]
    return dependencies + adapter_set(recipe).archive_steps(list(dict.fromkeys(read)))


def check(recipe: Recipe, item: str) -> None:
    """Set names are unique across fine-tunes and retention sets, retention datasets exist, models are reachable,
    lm-eval knows every task asked for (its own or include_path's)."""
    from pipeline.evaluation.lm_eval_tasks import check_tasks

    names = [f.name for f in recipe.finetunes] + [r.name for r in recipe.evaluate.retention]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RecipeError(
            f"evaluate.retention: names {repeated} repeat a fine-tune's or another retention set's; "
            "each set is a column of the report and needs its own name"
        )
    for index, retention in enumerate(recipe.evaluate.retention):
        with problems_at(f"evaluate.retention.{index}.dataset"):
            check_dataset_path(retention.dataset)
    with problems_at("evaluate.lm_eval"):
        check_model_reference(recipe.base_model, "base_model")
        check_model_reference(recipe.target_model, "target_model")
        check_tasks(recipe.evaluate.lm_eval)


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.evaluation.evaluate import chat_evaluation, evaluation_report
    from pipeline.evaluation.report import REPORT_MD, write_report
    from pipeline.evaluation.sets import held_out_set, retention_sets

    work_dir = Path(out) / "_work"
    chat = templates.chat_format(recipe.chat_template, recipe.base_model, recipe.target_model, recipe.trust_remote_code)
    held_out = [
        held_out_set(finetune.name, inputs.path("prepare", finetune.name), recipe.evaluate.max_samples)
        for finetune in recipe.finetunes
    ]
    retained = retention_sets(
        recipe.evaluate.retention,
        chat,
        work_dir,
        max_length=recipe.train.max_seq_length,
        max_samples=recipe.evaluate.max_samples,
    )
    # A fine-tune whose prepare held nothing out has no held-out set.
    sets = [s for s in held_out if s.input_ids] + retained
    report = evaluation_report(
        recipe.name,
        lineage(recipe, inputs),
        sets,
        chat_evaluation(
            recipe.evaluate, chat, trust_remote_code=recipe.trust_remote_code, adapter_dtype=recipe.apply.dtype
        ),
        cache_dir=Path(recipe.output_dir) / "cache" / "evaluate",
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    table = write_report(report, out)
    print(f"\n{table}")
    return {
        "models": report["models"],
        "sets": [s["name"] for s in report["sets"]],
        "loss": {
            model: {name: round(r["loss"], 4) if r["loss"] is not None else None for name, r in per_set.items()}
            for model, per_set in report["results"].items()
        },
        "report": str(STAGE.output_path(recipe, item) / REPORT_MD),
    }


def lineage(recipe: Recipe, inputs: Inputs) -> list[ModelSpec]:
    """The models `evaluate.models` asks for, in lineage order, each with the identity its cached scores are kept
    under. A trained model is the base plus its archived adapter (computed on the fly, as PEFT merges it). An adapted
    model is apply's output when apply saves it, else the target plus its verified archived adapter (computed on the
    fly). When the search chose another configuration than the published one, the published merge is scored beside it
    (`merged:published`, computed in memory)."""
    from pipeline.evaluation.models import ModelSpec

    wanted = recipe.evaluate.models
    code = recipe.trust_remote_code
    base_id, target_id = model_fingerprint(recipe.base_model), model_fingerprint(recipe.target_model)
    specs = []
    if "base" in wanted:
        specs.append(
            ModelSpec(
                "base", "base", resolve_model(recipe.base_model, "base_model", trust_remote_code=code), identity=base_id
            )
        )
    target = resolve_model(recipe.target_model, "target_model", trust_remote_code=code)
    if "target" in wanted:
        specs.append(ModelSpec("target", "target", target, identity=target_id))
    trained = _trained(recipe, inputs.adapters.names)
    if trained:
        base = resolve_model(recipe.base_model, "base_model", trust_remote_code=code)
    for name in trained:
        directory = inputs.adapter_dir(name)
        files = verify_adapter(directory)["files"]
        identity = hash_json({"base": base_id, "adapter": files, "apply_dtype": recipe.apply.dtype})
        specs.append(ModelSpec(f"trained:{name}", "trained", base, adapter=directory, identity=identity))
    for name in _adapted(recipe, inputs.adapters.names):
        directory = inputs.adapter_dir(name)
        files = verify_adapter(directory)["files"]
        identity = hash_json({"target": target_id, "adapter": files, "apply_dtype": recipe.apply.dtype})
        if saves_adapted_models(recipe):
            specs.append(ModelSpec(f"adapted:{name}", "adapted", inputs.path("apply", name), identity=identity))
        else:
            specs.append(ModelSpec(f"adapted:{name}", "adapted", target, adapter=directory, identity=identity))
    if "merged" in wanted:
        from pipeline.merging.output import read_merge_config

        merged = inputs.path("merge")
        identity = _merge_identity(recipe, inputs, read_merge_config(merged), base_id, target_id)
        specs.append(ModelSpec("merged", "merged", merged, identity=identity))
        published = _published_merge(recipe, inputs, target, base_id, target_id)
        if published is not None:
            specs.append(published)
    return specs


def _merge_identity(recipe: Recipe, inputs: Inputs, mergekit_config: dict, base_id: str, target_id: str) -> str:
    """A merge's identity without hashing its weights: its mergekit config, the adapters' files and the models."""
    files = {name: verify_adapter(inputs.adapter_dir(name))["files"] for name in inputs.adapters.names}
    return hash_json(
        {
            "mergekit_config": mergekit_config,
            "adapters": files,
            "base": base_id,
            "target": target_id,
            "apply_dtype": recipe.apply.dtype,
        }
    )


def _published_merge(recipe: Recipe, inputs: Inputs, target: Path, base_id: str, target_id: str) -> ModelSpec | None:
    """The search's `published` trial as a row of the report, unless it is the chosen one (then `merged` is it)."""
    from pipeline.evaluation.models import InMemoryMerge, ModelSpec
    from pipeline.merging.fused import FusedSources
    from pipeline.search.leaderboard import Leaderboard
    from pipeline.search.space import PUBLISHED

    search_dir = inputs.get("search")
    if search_dir is None or recipe.evaluate.load_in_4bit:  # a merge cannot be written into 4-bit weights
        return None
    board = Leaderboard.read(search_dir)
    published = board.trial(PUBLISHED)
    if published is None or board.chosen == PUBLISHED:
        return None
    names = inputs.adapters.names
    base = resolve_model(recipe.base_model, "base_model", trust_remote_code=recipe.trust_remote_code)
    sources = FusedSources(
        base,
        target,
        {name: inputs.adapter_dir(name) for name in names},
        adapted_model_names(recipe, names),
        recipe.apply.dtype,
    )
    merge = InMemoryMerge(published["mergekit_config"], sources, recipe.merge.device)
    return ModelSpec(
        f"merged:{PUBLISHED}",
        "merged",
        target,
        merge=merge,
        identity=_merge_identity(recipe, inputs, published["mergekit_config"], base_id, target_id),
    )


STAGE = Stage(name="evaluate", items=items, config=config, depends_on=depends_on, check=check, run=run)
