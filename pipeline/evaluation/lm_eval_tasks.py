"""lm-evaluation-harness tasks on a model already in memory (optional: run when `lm_eval` is installed).

Benchmarks such as hellaswag or gsm8k need a GPU in practice and data from the Hub; on machines without the
harness the report says so instead of failing, so a CPU run still produces its table.
"""

from __future__ import annotations

import importlib.util

from pipeline.recipe import LmEvalConfig

NOT_INSTALLED = "not run (lm_eval not installed)"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_status(config: LmEvalConfig) -> str | None:
    """None when the tasks will run (or none are asked for); otherwise why they are not run."""
    if not config.tasks:
        return None
    return None if lm_eval_available() else NOT_INSTALLED


def run_lm_eval(model, tokenizer, config: LmEvalConfig, *, batch_size: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from `lm_eval.simple_evaluate` on an HFLM wrapping the loaded model; standard errors
    and non-numeric entries (aliases) are left out of the table."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=harness_model, tasks=list(config.tasks), limit=config.limit, num_fewshot=config.num_fewshot
    )
    return {
        task: {
            metric: float(value)
            for metric, value in metrics.items()
            if isinstance(value, int | float) and "stderr" not in metric
        }
        for task, metrics in output["results"].items()
    }
