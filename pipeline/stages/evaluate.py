"""evaluate: base, target, each adapter on the base (trained) and on the target (adapted), and the merged model, scored
on every fine-tune's held-out split (what the merge learned, and how much of each LoRA transfers to the target) and on
the retention sets (what it kept); report.json, report.md and report.png."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.archive.store import verify_adapter
from pipeline.data import templates
from pipeline.data.loading import check_dataset_path
from pipeline.fingerprint import content_fingerprint, hash_json, model_fingerprint
from pipeline.models.hub import check_model_reference, resolve_model
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages.contract import Inputs, Stage, StageRef
from pipeline.stages.selection import (
    adapted_model_dir,
    adapter_dir,
    archive_inputs,
    foreign_adapter_files,
    saves_adapted_models,
    selected_adapters,
)

if TYPE_CHECKING:
    from pipeline.data.templates import ChatFormat
    from pipeline.evaluation.lineage import EvalSet, Evaluation
    from pipeline.evaluation.models import ModelSpec


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.evaluate.enabled else []


def _adapters(recipe: Recipe) -> list[str]:
    return selected_adapters(recipe) if "adapted" in recipe.evaluate.models else []


def _trained(recipe: Recipe) -> list[str]:
    """The adapters scored on the model they were trained on (base + LoRA), the yardstick of their transfer."""
    return selected_adapters(recipe) if "trained" in recipe.evaluate.models else []


def _fingerprint_of(reference: str) -> str:
    """Content of a local file or directory (`~` expanded, as the dataset is read); a Hub id stands for itself."""
    local = Path(reference).expanduser()
    return content_fingerprint(local) if local.exists() else reference


def retention_identity(recipe: Recipe) -> dict:
    """What the retention sets are rendered from (their content, the chat template, the base tokenizer,
    max_seq_length), as prepare fingerprints a fine-tune's data."""
    return {
        "data": {r.name: _fingerprint_of(r.dataset.path) for r in recipe.evaluate.retention},
        "chat_template": recipe.chat_template,
        "template_identity": templates.template_identity(recipe.chat_template, recipe.target_model),
        "base_tokenizer": templates.tokenizer_fingerprint(recipe.base_model),
        "max_seq_length": recipe.train.max_seq_length,
    }


def chat_format(recipe: Recipe) -> ChatFormat:
    """The chat format prepare rendered the fine-tunes with, which the retention sets are rendered with too."""
    return templates.chat_format(recipe.chat_template, recipe.base_model, recipe.target_model, recipe.trust_remote_code)


def evaluation_settings(recipe: Recipe, chat: ChatFormat) -> Evaluation:
    """What every model is scored with: the evaluate block, the device, and the tokens that pad and stop answers
    (the chat template's end-of-turn token, or the tokenizer's eos)."""
    from pipeline.evaluation.evaluate import chat_evaluation

    return chat_evaluation(
        recipe.evaluate, chat, trust_remote_code=recipe.trust_remote_code, adapter_dtype=recipe.apply.dtype
    )


def retention_sets(
    recipe: Recipe, chat: ChatFormat, work_dir: Path, names: set[str] | None = None, max_samples: int | None = None
) -> list[EvalSet]:
    """The retention sets (those in `names`, or all), rendered as prepare renders a fine-tune's data, each from its
    first `max_samples` rows (by default `evaluate.max_samples`)."""
    from pipeline.evaluation.sets import retention_set

    limit = recipe.evaluate.max_samples if max_samples is None else max_samples
    return [
        retention_set(retention, chat, work_dir, max_length=recipe.train.max_seq_length, max_samples=limit)
        for retention in recipe.evaluate.retention
        if names is None or retention.name in names
    ]


def config(recipe: Recipe, item: str) -> dict:
    """The evaluate block, the models' identities, and the retention sets' identity."""
    settings = {
        "evaluate": recipe.evaluate.model_dump(),
        "base": model_fingerprint(recipe.base_model),
        "target": model_fingerprint(recipe.target_model),
        "trust_remote_code": recipe.trust_remote_code,
        "adapters": _adapters(recipe),
        "trained": _trained(recipe),
    }
    if recipe.evaluate.retention:
        settings["retention"] = retention_identity(recipe)
    if recipe.evaluate.lm_eval.include_path is not None:
        settings["lm_eval_tasks"] = content_fingerprint(recipe.evaluate.lm_eval.include_path)
    if (settings["adapters"] and not saves_adapted_models(recipe)) or settings["trained"]:
        settings["apply_dtype"] = recipe.apply.dtype  # a model computed as weights + LoRA is loaded in it
    foreign = foreign_adapter_files(recipe, list(dict.fromkeys([*settings["adapters"], *settings["trained"]])))
    if foreign:
        settings["adapter_files"] = foreign
    return settings


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    dependencies = [StageRef("merge")] if "merged" in recipe.evaluate.models else []
    if "merged" in recipe.evaluate.models and recipe.search is not None:
        dependencies.append(StageRef("search"))  # the seed's configuration is scored beside the chosen one
    dependencies += [StageRef("prepare", finetune.name) for finetune in recipe.finetunes]
    adapters = _adapters(recipe)
    archived = archive_inputs(recipe, _trained(recipe))  # base + LoRA reads the archived adapter
    if saves_adapted_models(recipe):
        return dependencies + [StageRef("apply", name) for name in adapters] + archived
    return dependencies + list(dict.fromkeys([*archive_inputs(recipe, adapters), *archived]))


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
        check_dataset_path(retention.dataset, f"evaluate.retention.{index}.dataset")
    check_model_reference(recipe.base_model, "base_model")
    check_model_reference(recipe.target_model, "target_model")
    check_tasks(recipe.evaluate.lm_eval)


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.evaluation.evaluate import evaluation_report
    from pipeline.evaluation.report import write_report
    from pipeline.evaluation.sets import held_out_set

    work_dir = Path(out) / "_work"
    chat = chat_format(recipe)
    held_out = [
        held_out_set(finetune.name, inputs.path("prepare", finetune.name), recipe.evaluate.max_samples)
        for finetune in recipe.finetunes
    ]
    # A fine-tune whose prepare held nothing out has no held-out set.
    sets = [s for s in held_out if s.input_ids] + retention_sets(recipe, chat, work_dir)
    report = evaluation_report(
        recipe.name,
        lineage(recipe, inputs),
        sets,
        evaluation_settings(recipe, chat),
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
        "report": str(STAGE.output_path(recipe, item) / "report.md"),
    }


def lineage(recipe: Recipe, inputs: Inputs) -> list[ModelSpec]:
    """The models `evaluate.models` asks for, in lineage order, each with the identity its cached scores are kept
    under. A trained model is the base plus its archived adapter (computed on the fly, as PEFT merges it). An adapted
    model is apply's output when apply saves it, else the target plus its verified archived
    adapter (computed on the fly). When the search chose another configuration than the seed's, the seed's merge is
    scored beside it (`merged:seed`, computed in memory)."""
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
    if _trained(recipe):
        base = resolve_model(recipe.base_model, "base_model", trust_remote_code=code)
    for name in _trained(recipe):
        files = verify_adapter(adapter_dir(recipe, name))["files"]
        identity = hash_json({"base": base_id, "adapter": files, "apply_dtype": recipe.apply.dtype})
        specs.append(
            ModelSpec(f"trained:{name}", "trained", base, adapter=adapter_dir(recipe, name), identity=identity)
        )
    for name in _adapters(recipe):
        files = verify_adapter(adapter_dir(recipe, name))["files"]
        identity = hash_json({"target": target_id, "adapter": files, "apply_dtype": recipe.apply.dtype})
        if saves_adapted_models(recipe):
            specs.append(ModelSpec(f"adapted:{name}", "adapted", inputs.path("apply", name), identity=identity))
        else:
            specs.append(
                ModelSpec(f"adapted:{name}", "adapted", target, adapter=adapter_dir(recipe, name), identity=identity)
            )
    if "merged" in wanted:
        merged = inputs.path("merge")
        written = (merged / "mergekit_config.yml").read_text()
        specs.append(
            ModelSpec(
                "merged",
                "merged",
                merged,
                identity=_merge_identity(recipe, yaml.safe_load(written), base_id, target_id),
            )
        )
        seed = _seed_merge(recipe, inputs, target, base_id, target_id)
        if seed is not None:
            specs.append(seed)
    return specs


def _merge_identity(recipe: Recipe, mergekit_config: dict, base_id: str, target_id: str) -> str:
    """A merge's identity without hashing its weights: its mergekit config, the adapters' files and the models."""
    files = {name: verify_adapter(adapter_dir(recipe, name))["files"] for name in selected_adapters(recipe)}
    return hash_json(
        {
            "mergekit_config": mergekit_config,
            "adapters": files,
            "base": base_id,
            "target": target_id,
            "apply_dtype": recipe.apply.dtype,
        }
    )


def _seed_merge(recipe: Recipe, inputs: Inputs, target: Path, base_id: str, target_id: str) -> ModelSpec | None:
    """The search's `seed` trial as a row of the report, unless it is the chosen one (then `merged` is the seed's)."""
    from pipeline.evaluation.models import InMemoryMerge, ModelSpec

    search_dir = inputs.get("search")
    if search_dir is None or recipe.evaluate.load_in_4bit:  # a merge cannot be written into 4-bit weights
        return None
    board = json.loads((search_dir / "leaderboard.json").read_text())
    seed = next((trial for trial in board["trials"] if trial["label"] == "seed"), None)
    if seed is None or board["chosen"] == "seed":
        return None
    adapters = {
        str(adapted_model_dir(recipe, name).resolve()): adapter_dir(recipe, name) for name in selected_adapters(recipe)
    }
    base = resolve_model(recipe.base_model, "base_model", trust_remote_code=recipe.trust_remote_code)
    merge = InMemoryMerge(seed["mergekit_config"], base, adapters, recipe.apply.dtype, recipe.merge.device)
    return ModelSpec(
        "merged:seed",
        "merged",
        target,
        merge=merge,
        identity=_merge_identity(recipe, seed["mergekit_config"], base_id, target_id),
    )


STAGE = Stage(name="evaluate", items=items, config=config, depends_on=depends_on, check=check, run=run)
