"""search: which merge keeps what the target knew and learns the most of every fine-tune? Trials on an Optuna study,
each merged in memory by the fused engine and scored on small held-out subsets; the merge stage then writes the
chosen configuration. Runs when the recipe has a `search:` block.

Trials 0 and 1 are always the seed's configuration and the sum of the adapters' deltas over the target, so the
leaderboard shows them beside the chosen trial whatever they score. The study is `study.db` in the output (or
`search.storage`, a database URL several machines share): a killed search resumes without redoing finished trials.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from dataclasses import replace
from pathlib import Path

from pipeline import console
from pipeline.fingerprint import hash_json, model_fingerprint
from pipeline.models.hub import check_model_reference
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages.contract import Inputs, Stage, StageRef
from pipeline.stages.evaluate import chat_format, evaluation_settings, retention_identity, retention_sets
from pipeline.stages.selection import (
    adapted_model_dir,
    adapter_dir,
    archive_inputs,
    check_trained_on_base,
    foreign_adapter_files,
    selected_adapters,
)

# Merge settings a trial chooses; the rest of the recipe's `merge:` block is kept as it is.
SEARCHED_KEYS = ("method", "base_model", "include_target", "weight", "density", "models", "parameters")


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.search is not None else []


def learned_sets(recipe: Recipe) -> list[str]:
    """The merged fine-tunes of this recipe that hold out an eval split: the sets on which learning is measured."""
    merged = set(selected_adapters(recipe))
    return [f.name for f in recipe.finetunes if f.name in merged and f.dataset.eval_size > 0]


def kept_sets(recipe: Recipe) -> list[str]:
    return (recipe.search and recipe.search.retention) or [r.name for r in recipe.evaluate.retention]


def config(recipe: Recipe, item: str) -> dict:
    search = recipe.search
    return {
        "search": search.model_dump(exclude={"workers", "storage", "cache_gb"}),
        "merge": recipe.merge.model_dump(exclude=set(SEARCHED_KEYS)),
        "adapters": selected_adapters(recipe),
        "base": model_fingerprint(recipe.base_model),
        "target": model_fingerprint(recipe.target_model),
        "apply_dtype": recipe.apply.dtype,
        "retention": retention_identity(recipe),
        "evaluate": recipe.evaluate.model_dump(include={"dtype", "batch_size", "generate", "max_new_tokens"}),
        "adapter_files": foreign_adapter_files(recipe, selected_adapters(recipe)),
    }


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    return [
        *(StageRef("prepare", name) for name in learned_sets(recipe)),
        *archive_inputs(recipe, selected_adapters(recipe)),
    ]


def check(recipe: Recipe, item: str) -> None:
    """Known methods, sets that exist, something to learn and something to keep; nothing is loaded."""
    from pipeline.merging.config import mergekit_only_keys, method_spec
    from pipeline.search.space import SEARCHABLE_METHODS

    search = recipe.search
    needs_mergekit = mergekit_only_keys(recipe.merge)
    if needs_mergekit:
        raise RecipeError(
            f"search: trials are merged in memory by the fused engine, which cannot run {', '.join(needs_mergekit)}"
            " (mergekit only); remove the search: block or those keys"
        )
    for method in search.space.methods:
        method_spec(method)  # a RecipeError naming mergekit's methods when unknown
        if method not in SEARCHABLE_METHODS:
            raise RecipeError(
                f"search.space.methods: {method!r} is not a method the search can merge in memory "
                f"(one of: {', '.join(SEARCHABLE_METHODS)})"
            )
    known = [r.name for r in recipe.evaluate.retention]
    unknown = sorted(set(search.retention or []) - set(known))
    if unknown:
        raise RecipeError(f"search.retention: {unknown} are not retention sets (evaluate.retention has: {known})")
    if not kept_sets(recipe):
        raise RecipeError(
            "search: the gate needs a retention set (evaluate.retention) standing for what the target "
            "knew; without one every merge would pass"
        )
    if not learned_sets(recipe):
        raise RecipeError(
            "search: no merged fine-tune of this recipe holds out an eval split (dataset.eval_size > 0),"
            " so what a merge learned cannot be measured"
        )
    if search.metric == "exact_match" and not recipe.evaluate.generate:
        raise RecipeError("search.metric: exact_match scores greedy answers; set evaluate.generate: true")
    if recipe.evaluate.load_in_4bit:
        raise RecipeError(
            "search: trials write each merge into the loaded target's weights, which a 4-bit model "
            "cannot hold; set evaluate.load_in_4bit: false for a search (or run it on a larger GPU)"
        )
    adapters = selected_adapters(recipe)
    if not adapters:
        raise RecipeError("search: no adapter to merge")
    check_trained_on_base(recipe, adapters)
    check_model_reference(recipe.base_model, "base_model")
    check_model_reference(recipe.target_model, "target_model")


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.archive.store import verify_adapter
    from pipeline.merging.config import resolve_model_once
    from pipeline.search.leaderboard import write_outputs
    from pipeline.search.study import choose, closest, fail_abandoned, finished_trials, open_study, sqlite_url
    from pipeline.search.trials import SearchJob, references_of

    search = recipe.search
    adapters = {name: adapter_dir(recipe, name) for name in selected_adapters(recipe)}
    for path in adapters.values():
        verify_adapter(path)
    metric = search.metric if search.metric != "auto" else ("exact_match" if recipe.evaluate.generate else "loss")
    sets, evaluation = _sets(recipe, inputs, Path(out) / "_work", generate=metric == "exact_match")
    shutil.rmtree(Path(out) / "_work", ignore_errors=True)  # the rendered retention sets are in `sets` now
    job = SearchJob(
        base_dir=resolve_model_once(recipe.base_model, "base_model", recipe.trust_remote_code),
        target_dir=resolve_model_once(recipe.target_model, "target_model", recipe.trust_remote_code),
        adapters=adapters,
        adapted_paths={name: str(adapted_model_dir(recipe, name).resolve()) for name in adapters},
        apply_dtype=recipe.apply.dtype,
        sets=sets,
        evaluation=evaluation,
        finetunes=learned_sets(recipe),
        retention=kept_sets(recipe),
        metric=metric,
        tolerance=search.retention_tolerance,
        objective=search.objective,
        space=_space(recipe, list(adapters)),
        total=search.trials,
        sampler=search.sampler,
        seed=search.seed,
        storage=search.storage or sqlite_url(Path(out) / "study.db"),
        study_name=f"{recipe.name}-{hash_json(config(recipe, item))[:12]}",
        lock_path=Path(out) / "study.lock",
        device=recipe.merge.device,
        trust_remote_code=recipe.trust_remote_code,
        cache_bytes=int(search.cache_gb * 1024**3),
        settings=recipe.merge.model_dump(exclude=set(SEARCHED_KEYS) | {"adapters"}),
    )
    study = open_study(job.storage, job.study_name)
    redone = fail_abandoned(study)
    if redone:
        print(f"search: trials {redone} were left running by a killed search; they are redone")
    _work_in_parallel(job, search.workers)
    rows = finished_trials(study)
    chosen = choose(rows)
    fallback = False
    if chosen is None:
        nearest = closest(rows)
        if search.fallback is None:
            raise RuntimeError(
                f"search: none of {len(rows)} trials kept every retention set within {search.retention_tolerance:g} "
                f"of the target; closest: trial {nearest['label']} (kept {nearest['kept']}, learned "
                f"{nearest['learned']}). Widen search.space, raise search.retention_tolerance, or set "
                "search.fallback: seed"
            )
        chosen, fallback = next(row for row in rows if row["label"] == "seed"), True
    write_outputs(
        Path(out),
        rows,
        chosen,
        references=references_of(study),
        metric=metric,
        tolerance=search.retention_tolerance,
        fallback=fallback,
        objective=search.objective,
    )
    seed = next((row for row in rows if row["label"] == "seed"), None)
    return {
        "trials": len(rows),
        "chosen": chosen["label"],
        "objective": round(chosen["objective"], 4),
        "passes": chosen["passes"],
        "learned": chosen["learned"],
        "kept": chosen["kept"],
        "seed": None if seed is None else {"objective": round(seed["objective"], 4), "passes": seed["passes"]},
        "metric": metric,
        "fallback_to_seed": fallback,
    }


def _space(recipe: Recipe, adapters: list[str]):
    from pipeline.search.space import Space, with_baselines

    space = recipe.search.space
    return with_baselines(
        Space(
            tuple(adapters),
            tuple(space.methods),
            tuple(space.base_model),
            space.weight,
            space.density,
            space.target_weight,
            tuple(space.normalize),
        )
    )


def _sets(recipe: Recipe, inputs: Inputs, work_dir: Path, *, generate: bool):
    """The first `search.max_samples` rows of every learned set's held-out split and of every kept retention set,
    rendered as the evaluate stage renders them, and the evaluate settings trials are scored with."""
    from pipeline.evaluation.sets import held_out_set

    limit = recipe.search.max_samples
    chat = chat_format(recipe)
    sets = [held_out_set(name, inputs.path("prepare", name), limit) for name in learned_sets(recipe)]
    sets += retention_sets(recipe, chat, work_dir, set(kept_sets(recipe)), max_samples=limit)
    evaluation = evaluation_settings(recipe, chat)
    return sets, replace(evaluation, config=evaluation.config.model_copy(update={"generate": generate}))


def _work_in_parallel(job, workers: int) -> None:
    """This process and `workers - 1` spawned ones on the same study; a worker that fails fails the stage."""
    from pipeline.search.trials import work

    started = time.time()
    best: list[float] = []  # the best objective among trials that pass the gate, once one has
    bar = console.open_task("search", total=job.total, unit="trials")

    def progress(number: int, label: str | None, result: dict) -> None:
        gate = "pass" if result["passes"] else "fail"
        print(
            f"search: trial {label or number}: objective {result['objective']:.3f}, gate {gate} "
            f"({time.time() - started:.0f}s)",
            flush=True,
        )
        if result["passes"]:
            best[:] = [max([*best, result["objective"]])]
        bar.advance(info=f"best passing {best[0]:.3f}" if best else "none passes the gate yet")

    context = multiprocessing.get_context("spawn")
    others = [context.Process(target=work, args=(job,), daemon=True) for _ in range(workers - 1)]
    for process in others:
        process.start()
    try:
        work(job, on_trial=progress)
    finally:
        bar.finish()
        for process in others:
            process.join()
    failed = [process.exitcode for process in others if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"search: {len(failed)} of {len(others)} worker processes failed (exit codes {failed})")


STAGE = Stage(name="search", items=items, config=config, depends_on=depends_on, check=check, run=run, resumable=True)
