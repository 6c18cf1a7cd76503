"""Every model of the lineage on every set, one model in memory at a time: the numbers behind the report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.evaluation.generate import greedy_answers, prompt_ids, score_answers
from pipeline.evaluation.lm_eval_tasks import lm_eval_status, run_lm_eval
from pipeline.evaluation.loss import assistant_token_loss
from pipeline.evaluation.models import ModelSpec, load_causal_lm, release
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
        return {"name": self.name, "kind": self.kind, "source": self.source, "rows": len(self.input_ids),
                **({"rejected_rows": self.rejected} if self.rejected else {})}


@dataclass(frozen=True)
class Evaluation:
    """What stays the same for every model: settings, the shared tokenizer and the token ids used to pad and stop."""

    config: EvaluateConfig
    device: torch.device
    tokenizer: object
    stop_ids: list[int]
    pad_id: int
    trust_remote_code: bool = False
    adapter_dtype: str = "bfloat16"


def evaluate_set(model, label: str, eval_set: EvalSet, evaluation: Evaluation) -> dict:
    config = evaluation.config
    loss = assistant_token_loss(model, eval_set.input_ids, eval_set.assistant_masks, batch_size=config.batch_size,
                                pad_id=evaluation.pad_id, description=f"{label} {eval_set.name} loss")
    result = {"loss": None if not loss.tokens else loss.mean,
              "perplexity": None if not loss.tokens else loss.perplexity, "tokens": loss.tokens}
    if config.generate and eval_set.references is not None:
        rows = zip(eval_set.input_ids, eval_set.assistant_masks, strict=True)
        prompts = [prompt_ids(ids, mask) for ids, mask in rows]
        answers = greedy_answers(model, evaluation.tokenizer, prompts, stop_ids=evaluation.stop_ids,
                                 max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                 pad_id=evaluation.pad_id, description=f"{label} {eval_set.name} generate")
        scored = score_answers(answers, eval_set.references)
        result.update(exact_match=scored.exact_match, contains=scored.contains, samples=scored.samples,
                      examples=scored.examples)
    return result


def evaluate_model(spec: ModelSpec, sets: list[EvalSet], evaluation: Evaluation) -> tuple[dict, dict | None]:
    """Load one model, score it on every set (and the lm-eval tasks when they run), and let it go on return."""
    model = load_causal_lm(spec, dtype=evaluation.config.dtype, device=evaluation.device,
                           trust_remote_code=evaluation.trust_remote_code, adapter_dtype=evaluation.adapter_dtype)
    results = {eval_set.name: evaluate_set(model, spec.label, eval_set, evaluation) for eval_set in sets}
    harness = None
    lm_eval = evaluation.config.lm_eval
    if lm_eval.tasks and lm_eval_status(lm_eval) is None:
        harness = run_lm_eval(model, evaluation.tokenizer, lm_eval, batch_size=evaluation.config.batch_size)
    return results, harness


def evaluate_lineage(specs: list[ModelSpec], sets: list[EvalSet], evaluation: Evaluation) -> tuple[dict, dict]:
    """{model label: {set name: metrics}} and {model label: {task: {metric: value}}}; each model is freed (and
    garbage collected) before the next is loaded, so peak memory is one model plus one batch."""
    results, harness = {}, {}
    for spec in specs:
        print(f"evaluate: {spec.label} ({spec.path}{' + ' + spec.adapter.name if spec.adapter else ''})")
        results[spec.label], tasks = evaluate_model(spec, sets, evaluation)
        if tasks is not None:
            harness[spec.label] = tasks
        release(evaluation.device)
    return results, harness
