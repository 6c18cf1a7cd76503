"""A recipe's evaluation end to end: which models and sets, shared settings, and the report dictionary."""

from __future__ import annotations

from pathlib import Path

from pipeline.archive.store import adapter_dir, selected_adapters, verify_adapter
from pipeline.evaluation.lineage import EvalSet, Evaluation, evaluate_lineage
from pipeline.evaluation.lm_eval_tasks import lm_eval_status
from pipeline.evaluation.models import ModelSpec
from pipeline.evaluation.sets import ChatFormat, chat_format, held_out_set, retention_set
from pipeline.merging.adapted_model import resolve_device
from pipeline.models.hub import resolve_model
from pipeline.recipe import Recipe


def lineage_specs(recipe: Recipe, inputs: dict) -> list[ModelSpec]:
    """The models `evaluate.models` asks for, in lineage order. An adapted model comes from apply's output when the
    run has one, else from the target plus its verified archived adapter."""
    wanted = recipe.evaluate.models
    code = recipe.trust_remote_code
    specs = []
    if "base" in wanted:
        specs.append(ModelSpec("base", "base", resolve_model(recipe.base_model, "base_model", trust_remote_code=code)))
    target = resolve_model(recipe.target_model, "target_model", trust_remote_code=code)
    if "target" in wanted:
        specs.append(ModelSpec("target", "target", target))
    if "adapted" in wanted:
        for name in selected_adapters(recipe):
            if ("apply", name) in inputs:
                specs.append(ModelSpec(f"adapted:{name}", "adapted", Path(inputs[("apply", name)])))
            else:
                archived = Path(inputs.get(("archive", name)) or adapter_dir(recipe, name))
                verify_adapter(archived)
                specs.append(ModelSpec(f"adapted:{name}", "adapted", target, adapter=archived))
    if "merged" in wanted:
        specs.append(ModelSpec("merged", "merged", Path(inputs[("merge", "")])))
    return specs


def eval_sets(recipe: Recipe, inputs: dict, chat: ChatFormat, work_dir: Path) -> list[EvalSet]:
    """Every fine-tune's held-out split (skipped when prepare held nothing out), then the retention sets."""
    sets = [held_out_set(finetune.name, Path(inputs[("prepare", finetune.name)]), recipe.evaluate.max_samples)
            for finetune in recipe.finetunes]
    sets = [s for s in sets if s.input_ids]
    sets += [retention_set(recipe, retention, chat, work_dir) for retention in recipe.evaluate.retention]
    return sets


def evaluate_recipe(recipe: Recipe, inputs: dict, work_dir: Path) -> dict:
    """The full report: settings, models, sets, per model × set metrics and the lm-eval-harness outcome.
    Generation stops at the chat template's end-of-turn token (or the tokenizer's eos) for every model."""
    config = recipe.evaluate
    chat = chat_format(recipe)
    tokenizer = chat.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(chat.end_of_turn), tokenizer.eos_token_id} - {None})
    evaluation = Evaluation(config=config, device=resolve_device(config.device), tokenizer=tokenizer,
                            stop_ids=stop_ids, pad_id=pad_id, trust_remote_code=recipe.trust_remote_code,
                            adapter_dtype=recipe.apply.dtype)
    specs = lineage_specs(recipe, inputs)
    sets = eval_sets(recipe, inputs, chat, work_dir)
    results, harness = evaluate_lineage(specs, sets, evaluation)
    status = lm_eval_status(config.lm_eval)
    lm_eval = {"tasks": list(config.lm_eval.tasks), **({"status": status} if status else {"results": harness})}
    return {
        "name": recipe.name,
        "settings": {**config.model_dump(exclude={"retention", "models", "enabled", "lm_eval"}),
                     "device": str(evaluation.device)},
        "models": [spec.label for spec in specs],
        "model_paths": {spec.label: str(spec.path) + (f" + {spec.adapter}" if spec.adapter else "")
                        for spec in specs},
        "sets": [eval_set.describe() for eval_set in sets],
        "results": results,
        "lm_eval": lm_eval,
    }
