"""The `model-index` of a model card: the merged model's lm-eval scores in the form the Hub reads (and shows beside
the card), built with huggingface_hub's `EvalResult`/`ModelCardData` rather than by hand."""

from __future__ import annotations

# Dataset builders that name a file format, not a dataset: a local task reads its files through one of them.
FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


def eval_results(lm_eval: dict, model: str = "merged") -> list:
    """One `EvalResult` per (task, metric) `model` scored in report.json's lm-eval section; a task on local files
    is named by the task (its dataset type would otherwise be a file format such as `json`)."""
    from huggingface_hub import EvalResult

    results = []
    for task, metrics in sorted((lm_eval.get("results") or {}).get(model, {}).items()):
        dataset = (lm_eval.get("datasets") or {}).get(task) or {}
        path = dataset.get("path")
        hub_dataset = path is not None and path not in FILE_BUILDERS
        shots = (lm_eval.get("num_fewshot") or {}).get(task)
        for metric, value in metrics.items():
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task,
                    dataset_type=path if hub_dataset else task,
                    dataset_name=task,
                    dataset_config=dataset.get("name") if hub_dataset else None,
                    dataset_split=dataset.get("split"),
                    dataset_args={"num_few_shot": shots} if shots is not None else None,
                    metric_type=metric.partition(",")[0],
                    metric_name=metric,
                    metric_value=value,
                )
            )
    return results


def model_index(model_name: str, lm_eval: dict | None, model: str = "merged") -> dict:
    """`{"model-index": [...]}` for the card's front matter, or {} when `model` has no lm-eval scores."""
    from huggingface_hub import ModelCardData

    results = eval_results(lm_eval or {}, model)
    if not results:
        return {}
    return {"model-index": ModelCardData(model_name=model_name, eval_results=results).to_dict()["model-index"]}
