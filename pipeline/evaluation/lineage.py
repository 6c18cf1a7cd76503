"""Every model of the lineage on every set, one model in memory at a time: the numbers behind the report.

Scores are cached per (model identity, set content, settings), so adding an adapter to a lineage evaluates only
the new adapted model and the new merge: base, target and earlier adapted models are read from the cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.console import progress
from pipeline.evaluation import lm_eval_tasks
from pipeline.evaluation.generate import greedy_answers, prompt_ids, score_answers
from pipeline.evaluation.loss import assistant_token_loss
from pipeline.evaluation.models import ModelSpec, evaluation_dtype, load_causal_lm, release
from pipeline.files import read_json, write_json_atomic
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
        self.settings = hash_json(
            {
                **evaluation.config.scoring_settings(),
                "device": str(evaluation.device),
                "stop_ids": evaluation.stop_ids,
                "pad_id": evaluation.pad_id,
                "adapter_dtype": evaluation.adapter_dtype,
            }
        )

    def _path(self, model: str, eval_set: EvalSet) -> Path:
        return self.directory / f"{hash_json([model, eval_set.fingerprint(), self.settings])[:32]}.json"

    def get(self, model: str, eval_set: EvalSet) -> dict | None:
        return read_json(self._path(model, eval_set))

    def put(self, model: str, eval_set: EvalSet, result: dict) -> None:
        write_json_atomic(self._path(model, eval_set), result, indent=None)


class TaskScoreCache:
    """lm-eval scores, one JSON file per (model, task, settings) under `directory`: the task's identity (its YAML and
    local data files, lm-eval's version), the harness's settings (limit, few-shot, batch size, backend) and the
    model's (device, dtype, whether the chat template is applied and its text)."""

    def __init__(self, directory: Path, evaluation: Evaluation):
        self.directory = Path(directory)
        config = evaluation.config
        lm_eval = config.lm_eval
        self.settings = {
            **lm_eval.model_dump(exclude={"tasks", "include_path", "apply_chat_template"}),
            "batch_size": harness_batch_size(evaluation),
            "device": str(evaluation.device),
            "dtype": config.dtype,
            "load_in_4bit": config.load_in_4bit,
            "adapter_dtype": evaluation.adapter_dtype,
        }
        self.lm_eval = lm_eval
        self.tasks: dict[str, str] = {}
        self.chat_template = getattr(evaluation.tokenizer, "chat_template", None)

    def _path(self, spec: ModelSpec, task: str) -> Path:
        chat = lm_eval_tasks.uses_chat_template(self.lm_eval, spec.role)
        if task not in self.tasks:
            self.tasks[task] = lm_eval_tasks.task_identity(self.lm_eval, task)
        key = [spec.identity, self.tasks[task], self.settings, chat, self.chat_template if chat else None]
        return self.directory / f"{hash_json(key)[:32]}.json"

    def get(self, spec: ModelSpec, task: str) -> dict | None:
        return read_json(self._path(spec, task))

    def put(self, spec: ModelSpec, task: str, scores: dict) -> None:
        write_json_atomic(self._path(spec, task), scores, indent=None)


def load_model(spec: ModelSpec, evaluation: Evaluation):
    """The model of a report row: loaded as stored, or the target with a merge written into it in memory (the published
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
        from pipeline.merging.fused import FusedInputs, FusedOptions, load_merged

        merge = spec.merge
        with FusedInputs(merge.sources, FusedOptions(merge.device, evaluation.trust_remote_code)) as inputs:
            load_merged(inputs, validate_mergekit_config(merge.config), model)
    return model


def harness_batch_size(evaluation: Evaluation) -> int:
    return evaluation.config.lm_eval.batch_size or evaluation.config.batch_size


def harness_tasks(evaluation: Evaluation) -> list[str]:
    """The lm-eval tasks that run: none when none are asked for or lm_eval is not installed."""
    lm_eval = evaluation.config.lm_eval
    return list(lm_eval.tasks) if lm_eval.tasks and lm_eval_tasks.lm_eval_status(lm_eval) is None else []


def hf_task_scores(spec: ModelSpec, model, tasks: list[str], evaluation: Evaluation) -> dict[str, dict]:
    """{task: scores} of the loaded model, through lm-eval's HFLM."""
    lm_eval = evaluation.config.lm_eval
    harness = lm_eval_tasks.hf_harness_model(model, evaluation.tokenizer, batch_size=harness_batch_size(evaluation))
    return lm_eval_tasks.run_tasks(
        harness, tasks, lm_eval, chat_template=lm_eval_tasks.uses_chat_template(lm_eval, spec.role)
    )


def vllm_task_scores(
    spec: ModelSpec, model_dir: Path, tasks: list[str], evaluation: Evaluation, scratch: Path
) -> dict[str, dict]:
    """{task: scores} by lm-eval's vLLM backend from `model_dir` (an adapted model not saved by apply is the
    target with its adapter served as a vLLM LoRA), with the evaluation's tokenizer saved into `scratch`."""
    lm_eval = evaluation.config.lm_eval
    evaluation.tokenizer.save_pretrained(scratch / "tokenizer")
    harness = lm_eval_tasks.vllm_harness_model(
        model_dir,
        scratch / "tokenizer",
        dtype=str(evaluation_dtype(evaluation.config.dtype, evaluation.device)).removeprefix("torch."),
        batch_size=harness_batch_size(evaluation),
        trust_remote_code=evaluation.trust_remote_code,
        adapter_dir=spec.adapter,
        load_in_4bit=evaluation.config.load_in_4bit,
    )
    try:
        return lm_eval_tasks.run_tasks(
            harness, tasks, lm_eval, chat_template=lm_eval_tasks.uses_chat_template(lm_eval, spec.role)
        )
    finally:
        del harness
        release(evaluation.device)


def evaluate_model(
    spec: ModelSpec,
    sets: list[EvalSet],
    evaluation: Evaluation,
    cache: ScoreCache | None = None,
    task_cache: TaskScoreCache | None = None,
) -> tuple[dict, dict | None]:
    """Score one model on every set and lm-eval task: from the caches where they have the score, else with the
    model loaded once and let go on return (the vLLM backend loads the model itself: the transformers model is
    loaded only for the sets, or to write an in-memory merge)."""
    tasks = harness_tasks(evaluation)
    cached = spec.identity is not None
    results = {s.name: cache.get(spec.identity, s) if cache and cached else None for s in sets}
    harness = {task: task_cache.get(spec, task) if task_cache and cached else None for task in tasks}
    missing_tasks = [task for task, scores in harness.items() if scores is None]
    vllm = evaluation.config.lm_eval.backend == "vllm"
    needs_model = any(r is None for r in results.values()) or (missing_tasks and (not vllm or spec.merge is not None))
    if not needs_model and not missing_tasks:
        print(f"evaluate: {spec.label}: every score cached")
        return results, harness or None
    model = load_model(spec, evaluation) if needs_model else None
    for eval_set in sets:
        if results[eval_set.name] is None:
            results[eval_set.name] = evaluate_set(model, spec.label, eval_set, evaluation)
            if cache and cached:
                cache.put(spec.identity, eval_set, results[eval_set.name])
    if missing_tasks:
        print(f"evaluate: {spec.label}: lm-eval {', '.join(missing_tasks)}")
        if not vllm:
            scored = hf_task_scores(spec, model, missing_tasks, evaluation)
        else:
            with tempfile.TemporaryDirectory(prefix="ftmerge-vllm-") as scratch:
                model_dir = spec.path
                if spec.merge is not None:  # vLLM reads a directory: the in-memory merge is written out
                    model_dir = Path(scratch) / "model"
                    model.save_pretrained(model_dir)
                model = None  # the GPU memory goes to vLLM
                release(evaluation.device)
                scored = vllm_task_scores(spec, model_dir, missing_tasks, evaluation, Path(scratch))
        for task in missing_tasks:
            harness[task] = scored[task]
            if task_cache and cached:
                task_cache.put(spec, task, scored[task])
    return results, harness or None


def evaluate_lineage(
    specs: list[ModelSpec],
    sets: list[EvalSet],
    evaluation: Evaluation,
    cache: ScoreCache | None = None,
    task_cache: TaskScoreCache | None = None,
) -> tuple[dict, dict]:
    """{model label: {set name: metrics}} and {model label: {task: scores}}; each model is freed (and garbage
    collected) before the next is loaded, so peak memory is one model plus one batch."""
    results, harness = {}, {}
    with progress("evaluate", total=len(specs) * len(sets), unit="model×set") as bar:
        for spec in specs:
            print(f"evaluate: {spec.label} ({spec.path}{' + ' + spec.adapter.name if spec.adapter else ''})")
            bar.update(info=spec.label)
            results[spec.label], tasks = evaluate_model(spec, sets, evaluation, cache, task_cache)
            bar.advance(len(sets))
            if tasks is not None:
                harness[spec.label] = tasks
            release(evaluation.device)
    return results, harness
