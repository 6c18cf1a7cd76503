"""Every model of the lineage on every set, one model in memory at a time: the numbers behind the report.

Scores are cached per (model identity, set content, settings), so adding an adapter to a lineage evaluates only
the new adapted model and the new merge: base, target and earlier adapted models are read from the cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.console import progress
from pipeline.evaluation.generate import greedy_answers, prompt_ids, score_answers
from pipeline.evaluation.lm_eval_tasks import lm_eval_status, run_lm_eval
from pipeline.evaluation.loss import assistant_token_loss
from pipeline.evaluation.models import ModelSpec, load_causal_lm, release
from pipeline.fingerprint import hash_json
from pipeline.recipe import EvaluateConfig


@dataclass(frozen=True)
class EvalSet:
    """Prepared rows of one set: ids, assistant masks and the reference (last assistant) answer of each row (None
    for plain-text sets, which are scored by loss only)."""

    name: str
    kind: str
    source: str
    input_ids: list[list[int]]
    assistant_masks: list[list[int]]
    references: list[str] | None
    rejected: int = 0

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "rows": len(self.input_ids),
            **({"rejected_rows": self.rejected} if self.rejected else {}),
        }

    def fingerprint(self) -> str:
        """What is scored: the rows and references (not where they came from)."""
        return hash_json({"input_ids": self.input_ids, "masks": self.assistant_masks, "references": self.references})


@dataclass(frozen=True)
class Evaluation:
    """What stays the same for every model: settings, the shared tokenizer and the token ids used to pad and stop."""

    config: EvaluateConfig
    device: torch.device
    tokenizer: object
    stop_ids: list[int]
    pad_id: int
    trust_remote_code: bool = False
    adapter_dtype: str = "auto"


def evaluate_set(model, label: str, eval_set: EvalSet, evaluation: Evaluation) -> dict:
    config = evaluation.config
    loss = assistant_token_loss(
        model,
        eval_set.input_ids,
        eval_set.assistant_masks,
        batch_tokens=config.batch_tokens,
        pad_id=evaluation.pad_id,
        description=f"{label} {eval_set.name} loss",
    )
    result = {
        "loss": None if not loss.tokens else loss.mean,
        "perplexity": None if not loss.tokens else loss.perplexity,
        "tokens": loss.tokens,
    }
    if config.generate and eval_set.references is not None:
        rows = zip(eval_set.input_ids, eval_set.assistant_masks, strict=True)
        prompts = [prompt_ids(ids, mask) for ids, mask in rows]
        answers = greedy_answers(
            model,
            evaluation.tokenizer,
            prompts,
            stop_ids=evaluation.stop_ids,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            pad_id=evaluation.pad_id,
            description=f"{label} {eval_set.name} generate",
        )
        scored = score_answers(answers, eval_set.references)
        result.update(
            exact_match=scored.exact_match, contains=scored.contains, samples=scored.samples, examples=scored.examples
        )
    return result


class ScoreCache:
    """One JSON file per (model, set, settings) under `directory`, written atomically."""

    def __init__(self, directory: Path, evaluation: Evaluation):
        self.directory = Path(directory)
        config = evaluation.config.model_dump(exclude={"retention", "models", "enabled", "lm_eval", "max_samples"})
        self.settings = hash_json(
            {
                **config,
                "device": str(evaluation.device),
                "stop_ids": evaluation.stop_ids,
                "pad_id": evaluation.pad_id,
                "adapter_dtype": evaluation.adapter_dtype,
            }
        )

    def _path(self, model: str, eval_set: EvalSet) -> Path:
        return self.directory / f"{hash_json([model, eval_set.fingerprint(), self.settings])[:32]}.json"

    def get(self, model: str, eval_set: EvalSet) -> dict | None:
        try:
            return json.loads(self._path(model, eval_set).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, model: str, eval_set: EvalSet, result: dict) -> None:
        path = self._path(model, eval_set)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(result))
        os.replace(temporary, path)


def load_model(spec: ModelSpec, evaluation: Evaluation):
    """The model of a report row: loaded as stored, or the target with a merge written into it in memory (the seed's
    configuration beside the search's choice, without writing a second merged model)."""
    model = load_causal_lm(
        spec,
        dtype=evaluation.config.dtype,
        device=evaluation.device,
        trust_remote_code=evaluation.trust_remote_code,
        adapter_dtype=evaluation.adapter_dtype,
        load_in_4bit=evaluation.config.load_in_4bit,
    )
    if spec.merge is not None:
        from pipeline.merging.config import validate_mergekit_config
        from pipeline.merging.fused import FusedInputs, load_merged

        merge = spec.merge
        with FusedInputs(
            base_dir=merge.base_dir,
            target_dir=spec.path,
            adapters=merge.adapters,
            apply_dtype=merge.apply_dtype,
            device=merge.device,
            trust_remote_code=evaluation.trust_remote_code,
        ) as inputs:
            load_merged(inputs, validate_mergekit_config(merge.config), model)
    return model


def evaluate_model(
    spec: ModelSpec, sets: list[EvalSet], evaluation: Evaluation, cache: ScoreCache | None = None
) -> tuple[dict, dict | None]:
    """Score one model on every set (and the lm-eval tasks when they run): from the cache where it has the score,
    else with the model loaded once and let go on return."""
    lm_eval = evaluation.config.lm_eval
    harness_runs = bool(lm_eval.tasks) and lm_eval_status(lm_eval) is None
    use_cache = cache is not None and spec.identity is not None
    results = {s.name: cache.get(spec.identity, s) for s in sets} if use_cache else {s.name: None for s in sets}
    if all(result is not None for result in results.values()) and not harness_runs:
        print(f"evaluate: {spec.label}: every score cached")
        return results, None
    model = load_model(spec, evaluation)
    for eval_set in sets:
        if results[eval_set.name] is None:
            results[eval_set.name] = evaluate_set(model, spec.label, eval_set, evaluation)
            if use_cache:
                cache.put(spec.identity, eval_set, results[eval_set.name])
    harness = (
        run_lm_eval(model, evaluation.tokenizer, lm_eval, batch_size=evaluation.config.batch_size)
        if harness_runs
        else None
    )
    return results, harness


def evaluate_lineage(
    specs: list[ModelSpec], sets: list[EvalSet], evaluation: Evaluation, cache: ScoreCache | None = None
) -> tuple[dict, dict]:
    """{model label: {set name: metrics}} and {model label: {task: {metric: value}}}; each model is freed (and
    garbage collected) before the next is loaded, so peak memory is one model plus one batch."""
    results, harness = {}, {}
    with progress("evaluate", total=len(specs) * len(sets), unit="model×set") as bar:
        for spec in specs:
            print(f"evaluate: {spec.label} ({spec.path}{' + ' + spec.adapter.name if spec.adapter else ''})")
            bar.update(info=spec.label)
            results[spec.label], tasks = evaluate_model(spec, sets, evaluation, cache)
            bar.advance(len(sets))
            if tasks is not None:
                harness[spec.label] = tasks
            release(evaluation.device)
    return results, harness
