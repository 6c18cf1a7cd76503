"""lm-evaluation-harness tasks for every model of the lineage (the `lm-eval` extra, which `make setup` installs).

Standard benchmarks (IFEval, MMLU, GSM8K, HellaSwag) read their data from the Hub; a team's own tasks in
`include_path` (YAMLs and local data files) run offline. With the `hf` backend the harness wraps the model already
loaded for the loss tables (HFLM); with `vllm` lm-eval's vLLM backend loads the model from its directory (a GPU
option, not exercised on this project's CPU machines). Without lm_eval installed the report says so instead of
failing, so a run still produces its tables.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import math
from pathlib import Path

from pipeline.errors import ConfigProblem
from pipeline.fingerprint import content_fingerprint, hash_json, sha256_file
from pipeline.recipe import LmEvalConfig

NOT_INSTALLED = "not run (lm_eval not installed: pip install -e '.[lm-eval]')"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_status(config: LmEvalConfig) -> str | None:
    """None when the tasks will run (or none are asked for); otherwise why they are not run."""
    if not config.tasks:
        return None
    return None if lm_eval_available() else NOT_INSTALLED


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def uses_chat_template(config: LmEvalConfig, role: str) -> bool:
    """`auto`: the instruct models (target, adapted, merged, and each LoRA on the base, trained in the template)
    are prompted through the chat template, as users compare instruct models; the base, never trained on the
    template's turns, gets the plain prompt."""
    if config.apply_chat_template == "auto":
        return role != "base"
    return config.apply_chat_template


@functools.cache
def task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """lm-eval's TaskManager over `include_path` alone when it defines every task asked for (indexing lm-eval's
    own 14,000 task files takes seconds), else over both (include_path's tasks take precedence)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_subtasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def manager_for(config: LmEvalConfig):
    include_path = None if config.include_path is None else str(config.include_path)
    return task_manager(include_path, tuple(config.tasks))


def check_tasks(config: LmEvalConfig) -> None:
    """Every task name is one lm-eval knows (its own or include_path's), or a task YAML file; else a ConfigProblem
    at `tasks` naming the unknown ones with the closest known names. Nothing is downloaded."""
    if not config.tasks or not lm_eval_available():
        return
    known = manager_for(config).all_tasks
    unknown = [task for task in config.tasks if task not in known and not Path(task).is_file()]
    if not unknown:
        return
    hints = []
    for task in unknown:
        close = difflib.get_close_matches(task, known, n=3)
        hints.append(f"{task!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"lm-eval's tasks and those in {config.include_path}" if config.include_path else "lm-eval's tasks"
    raise ConfigProblem(
        f"unknown task {', '.join(hints)}: not among {where}. `lm-eval ls tasks` lists them; a task of your own "
        "goes in a YAML under include_path",
        ("tasks",),
    )


def _local_files(data_files) -> list[Path]:
    """The existing files a task's `dataset_kwargs.data_files` names (a path, a list, or split → path(s))."""
    if isinstance(data_files, str):
        return [Path(data_files)] if Path(data_files).is_file() else []
    values = data_files.values() if isinstance(data_files, dict) else data_files or []
    return [file for value in values for file in _local_files(value)]


def task_identity(config: LmEvalConfig, task: str) -> str:
    """What a task's scores depend on besides the model and the settings: lm-eval's version, the task's YAML (its
    includes resolved) and the content of the local data files it reads; for a group or tag, also the content of
    include_path (its tasks' files). Editing a team's jsonl re-scores that task only."""
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = manager_for(config)
    entry = manager.task_index.get(task)
    path = entry.yaml_path if entry is not None else (Path(task) if Path(task).is_file() else None)
    identity: dict = {"task": task, "lm_eval": lm_eval_version()}
    if path is not None:
        definition = load_yaml(path, resolve_func=False, recursive=True)
        files = _local_files((definition.get("dataset_kwargs") or {}).get("data_files"))
        identity.update(definition=definition, data_files={str(file): sha256_file(file) for file in files})
    if task not in manager.all_subtasks and config.include_path is not None:
        identity["include_path"] = content_fingerprint(config.include_path)
    return hash_json(identity)


def hf_harness_model(model, tokenizer, *, batch_size: int):
    """The loaded model as lm-eval's HFLM (nothing is loaded again)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def vllm_harness_model(
    model_dir: Path,
    tokenizer_dir: Path,
    *,
    dtype: str,
    batch_size: int,
    trust_remote_code: bool = False,
    adapter_dir: Path | None = None,
    load_in_4bit: bool = False,
):
    """lm-eval's vLLM backend on a model directory; an archived adapter is served as a vLLM LoRA (not merged into
    the weights), with the adapter's own rank. Needs a GPU and `pip install vllm`."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("evaluate.lm_eval.backend: vllm needs vLLM (`pip install vllm`, on a CUDA machine)")
    from lm_eval.models.vllm_causallms import VLLM

    extra = {}
    if adapter_dir is not None:
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
        extra.update(lora_local_path=str(adapter_dir), max_lora_rank=rank)
    if load_in_4bit:
        extra["quantization"] = "bitsandbytes"
    return VLLM(
        pretrained=str(model_dir),
        tokenizer=str(tokenizer_dir),
        dtype=dtype,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        **extra,
    )


def run_tasks(harness_model, tasks: list[str], config: LmEvalConfig, *, chat_template: bool) -> dict[str, dict]:
    """{task: scores} with `task_scores`; one `simple_evaluate` per task, so a task's scores (and its seeded
    few-shot draws) do not depend on which other tasks ran beside it, and each is cached on its own."""
    import lm_eval

    manager = manager_for(config)
    scores = {}
    for task in tasks:
        output = lm_eval.simple_evaluate(
            model=harness_model,
            tasks=[task],
            task_manager=manager,
            limit=config.limit,
            num_fewshot=config.num_fewshot,
            apply_chat_template=chat_template,
            fewshot_as_multiturn=chat_template,
            log_samples=False,
        )
        scores[task] = task_scores(output, task)
    return scores


def _metric_name(key: str) -> str:
    """lm-eval's `acc,none` → `acc`; a filtered metric keeps its filter: `exact_match,strict-match`."""
    metric, _, name = key.partition(",")
    return metric if name in ("", "none") else key


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def task_scores(output: dict, task: str) -> dict:
    """What the report keeps of one task's `simple_evaluate` output: `rows` (the task's own row, or a tag's tasks),
    and per row its metrics, standard errors, documents scored, few-shot count, higher-is-better and dataset."""
    results = {**output.get("results", {}), **output.get("groups", {})}
    rows = [task] if task in results else sorted(results)
    scores, stderr, datasets = {}, {}, {}
    for row, metrics in results.items():
        scores[row] = {
            _metric_name(key): number
            for key, value in metrics.items()
            if "_stderr" not in key and key != "sample_len" and (number := _number(value)) is not None
        }
        stderr[row] = {
            _metric_name(key.replace("_stderr", "")): number
            for key, value in metrics.items()
            if "_stderr" in key and (number := _number(value)) is not None
        }
        config = output.get("configs", {}).get(row, {})
        datasets[row] = {
            "path": config.get("dataset_path"),
            "name": config.get("dataset_name"),
            "split": config.get("test_split") or config.get("validation_split"),
        }
    return {
        "rows": rows,
        "scores": scores,
        "stderr": stderr,
        "samples": {row: n.get("effective") for row, n in output.get("n-samples", {}).items()},
        "num_fewshot": dict(output.get("n-shot", {})),
        "higher_is_better": dict(output.get("higher_is_better", {})),
        "datasets": datasets,
    }
