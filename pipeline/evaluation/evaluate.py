"""An evaluation end to end: the settings every model shares, and the report dictionary of a lineage on its sets.

Which models and which sets is the evaluate stage's choice; this module takes them as values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.evaluation.lineage import EvalSet, Evaluation, ScoreCache, TaskScoreCache, evaluate_lineage
from pipeline.evaluation.lm_eval_tasks import lm_eval_status, uses_chat_template
from pipeline.evaluation.models import ModelSpec
from pipeline.evaluation.transfer import transfer_report
from pipeline.merging.adapted_model import resolve_device

if TYPE_CHECKING:
    from pipeline.data.templates import ChatFormat
    from pipeline.recipe import EvaluateConfig


def chat_evaluation(
    config: EvaluateConfig, chat: ChatFormat, *, trust_remote_code: bool = False, adapter_dtype: str = "bfloat16"
) -> Evaluation:
    """Settings for every model: generation stops at the chat template's end-of-turn token (or the tokenizer's
    eos), and pads with the pad token (or eos)."""
    tokenizer = chat.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(chat.end_of_turn), tokenizer.eos_token_id} - {None})
    return Evaluation(
        config=config,
        device=resolve_device(config.device),
        tokenizer=tokenizer,
        stop_ids=stop_ids,
        pad_id=pad_id,
        trust_remote_code=trust_remote_code,
        adapter_dtype=adapter_dtype,
    )


def evaluation_report(
    name: str, specs: list[ModelSpec], sets: list[EvalSet], evaluation: Evaluation, cache_dir: Path | None = None
) -> dict:
    """The full report: settings, models, sets, per model × set metrics, each adapter's transfer from the base to the
    target (pipeline.evaluation.transfer) and the lm-eval-harness outcome. With `cache_dir`, scores of models and
    sets seen before (same identity, content and settings) are reused."""
    config = evaluation.config
    cache = ScoreCache(cache_dir, evaluation) if cache_dir is not None else None
    task_cache = TaskScoreCache(Path(cache_dir) / "lm_eval", evaluation) if cache_dir is not None else None
    results, harness = evaluate_lineage(specs, sets, evaluation, cache, task_cache)
    status = lm_eval_status(config.lm_eval)
    lm_eval = {"tasks": list(config.lm_eval.tasks)}
    if status:
        lm_eval["status"] = status
    elif config.lm_eval.tasks:
        lm_eval.update(harness_report(specs, harness, config))
    return {
        "name": name,
        "settings": {
            **config.scoring_settings(),
            "max_samples": config.max_samples,
            "device": str(evaluation.device),
        },
        "models": [spec.label for spec in specs],
        "model_paths": {spec.label: str(spec.path) + (f" + {spec.adapter}" if spec.adapter else "") for spec in specs},
        "sets": [eval_set.describe() for eval_set in sets],
        "results": results,
        "transfer": transfer_report(results, [s.name for s in sets if s.kind == "held-out"], config.generate),
        "lm_eval": lm_eval,
    }


def harness_report(specs: list[ModelSpec], harness: dict, config: EvaluateConfig) -> dict:
    """The lm-eval part of report.json: per model the metrics of each task's own row (`results`; a tag's tasks when
    the tag has no row), their standard errors, the other rows (a group's subtasks), and per row the documents
    scored, few-shot count, higher-is-better and dataset; which models were prompted through the chat template."""
    lm_eval = config.lm_eval
    report = {
        "backend": lm_eval.backend,
        "limit": lm_eval.limit,
        "chat_template": {spec.label: uses_chat_template(lm_eval, spec.role) for spec in specs},
        "results": {},
        "stderr": {},
        "subtasks": {},
        "samples": {},
        "num_fewshot": {},
        "higher_is_better": {},
        "datasets": {},
    }
    for label, tasks in harness.items():
        for key in ("results", "stderr", "subtasks"):
            report[key][label] = {}
        for scores in tasks.values():
            for row, metrics in scores["scores"].items():
                key = "results" if row in scores["rows"] else "subtasks"
                report[key][label][row] = metrics
                if row in scores["rows"]:
                    report["stderr"][label][row] = scores["stderr"].get(row, {})
            for key in ("samples", "num_fewshot", "higher_is_better", "datasets"):
                report[key].update(scores[key])
    if not any(report["subtasks"].values()):
        del report["subtasks"]
    return report
