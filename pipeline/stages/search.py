"""search: which merge keeps what the target knew and learns the most of every fine-tune? Trials on an Optuna study,
each merged in memory by the fused engine and scored on small held-out subsets; the merge stage then writes the
chosen configuration. Runs when the recipe has a `search:` block.

Trials 0 and 1 are always the published configuration and the sum of the adapters' deltas over the target, so the
leaderboard shows them beside the chosen trial whatever they score. The study is `study.db` in the output (or
`search.storage`, a PostgreSQL database that `ftmerge search-worker` processes on other machines share): a killed
search resumes without redoing finished trials.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from pipeline import console
from pipeline.fingerprint import content_fingerprint, model_fingerprint
from pipeline.models.hub import check_model_reference
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef, problems_at
from pipeline.stages.selection import adapted_model_names, adapter_set, check_trained_on_base, selected_adapters

# Merge settings a trial chooses; the rest of the recipe's `merge:` block is kept as it is.
SEARCHED_KEYS = ("method", "base_model", "include_target", "weight", "density", "models", "parameters")
# Settings of where and how trials run, which never change a trial's result.


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.search is not None else []


def learned_sets(recipe: Recipe) -> list[str]:
    """The merged fine-tunes of this recipe that hold out an eval split: the sets on which learning is measured."""
    merged = set(selected_adapters(recipe))
    return [f.name for f in recipe.finetunes if f.name in merged and f.dataset.eval_size > 0]


def kept_sets(recipe: Recipe) -> list[str]:
    return (recipe.search and recipe.search.retention) or [r.name for r in recipe.evaluate.retention]


def config(recipe: Recipe, item: str) -> dict:
    from pipeline.evaluation.identity import retention_identity

    search = recipe.search
    return {
        "search": result_settings(search),
        "merge": {key: value for key, value in result_settings(recipe.merge).items() if key not in SEARCHED_KEYS},
        "adapters": selected_adapters(recipe),
        "base": model_fingerprint(recipe.base_model),
        "target": model_fingerprint(recipe.target_model),
        "apply_dtype": recipe.apply.dtype,
        "retention": retention_identity(
            recipe.evaluate.retention,
            chat_template=recipe.chat_template,
            base_model=recipe.base_model,
            target_model=recipe.target_model,
            max_length=recipe.train.max_seq_length,
        ),
        "evaluate": recipe.evaluate.scoring_settings(),
        "adapter_files": adapter_set(recipe).foreign_files(selected_adapters(recipe)),
    }


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    return [
        *(StageRef("prepare", name) for name in learned_sets(recipe)),
        *adapter_set(recipe).archive_steps(selected_adapters(recipe)),
    ]


def check(recipe: Recipe, item: str) -> None:
    """Known methods, sets that exist, something to learn and something to keep; nothing is loaded."""
    from pipeline.merging.config import MergeConfigError, mergekit_only_keys, method_spec
    from pipeline.search.space import SEARCHABLE_METHODS

    search = recipe.search
    needs_mergekit = mergekit_only_keys(recipe.merge)
    if needs_mergekit:
        raise RecipeError(
            "search: trials are merged in memory by the fused engine, which cannot run "
            f"{', '.join(f'merge.{key}' for key in needs_mergekit)} (mergekit only); remove the search: block or "
            "those keys"
        )
    for method in search.space.methods:
        try:
            method_spec(method)
        except MergeConfigError as error:
            raise RecipeError(f"search.space.methods: {error}") from None
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
    with problems_at():
        check_model_reference(recipe.base_model, "base_model")
        check_model_reference(recipe.target_model, "target_model")
    if search.storage is not None:
        from pipeline.search.storage import StorageError, resolve_storage

        try:
            resolve_storage(search.storage)
        except StorageError as error:
            raise RecipeError(f"search.storage: {error}") from None


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.search.leaderboard import write_outputs
    from pipeline.search.space import PUBLISHED
    from pipeline.search.study import choose, fail_abandoned, finished_trials, open_study
    from pipeline.search.trials import mergekit_config, references_of, work_in_parallel

    search = recipe.search
    job = search_job(recipe, inputs, Path(out) / "_work", Path(out) / "study.lock", default_db=Path(out) / "study.db")
    say_storage(recipe, job)
    study = open_study(job.storage, job.study_name, job.heartbeat)
    redone = fail_abandoned(study)
    if redone:
        console.notice(f"search: trials {redone} were left running by a killed search; they are redone")
    work_in_parallel(job, search.workers, say=console.say)
    # As the merge stage here writes each trial (a worker on another machine merged its own copies' paths).
    rows = [{**row, "mergekit_config": mergekit_config(job, row["merge"])} for row in finished_trials(study)]
    chosen = choose(rows)
    fallback = chosen is None
    if fallback:
        chosen = _fallback(recipe, rows)
    write_outputs(
        Path(out),
        rows,
        chosen,
        references=references_of(study),
        metric=job.metric,
        tolerance=search.retention_tolerance,
        fallback=fallback,
        objective=search.objective,
    )
    published = next((row for row in rows if row["label"] == PUBLISHED), None)
    return {
        "trials": len(rows),
        "chosen": chosen["label"],
        "objective": round(chosen["objective"], 4),
        "passes": chosen["passes"],
        "learned": chosen["learned"],
        "kept": chosen["kept"],
        PUBLISHED: None
        if published is None
        else {"objective": round(published["objective"], 4), "passes": published["passes"]},
        "metric": job.metric,
        "fallback_to_published": fallback,
    }


def _fallback(recipe: Recipe, rows: list[dict]) -> dict:
    """The published configuration's trial when `search.fallback` allows it; otherwise the search fails, saying
    which trial came closest to the gate."""
    from pipeline.search.space import PUBLISHED
    from pipeline.search.study import closest

    if recipe.search.fallback is None:
        nearest = closest(rows)
        raise RuntimeError(
            f"search: none of {len(rows)} trials kept every retention set within "
            f"{recipe.search.retention_tolerance:g} of the target; closest: trial {nearest['label']} (kept "
            f"{nearest['kept']}, learned {nearest['learned']}). Widen search.space, raise "
            "search.retention_tolerance, or set search.fallback: published"
        )
    console.notice("search: no trial passed the gate; the published configuration is merged (search.fallback)")
    return next(row for row in rows if row["label"] == PUBLISHED)


def search_job(recipe: Recipe, inputs: Inputs, work_dir: Path, lock_path: Path, default_db: Path | None = None):
    """Everything a search process needs, from the recipe and the outputs it reads (prepare's held-out splits, the
    archive): the stage's own process, its spawned workers and `ftmerge search-worker` on other machines alike.
    `work_dir` is scratch space for rendering the retention sets; `default_db` the SQLite study without
    `search.storage`."""
    from pipeline.archive.store import verify_adapter
    from pipeline.merging.config import resolve_model_once
    from pipeline.search.coordination import Heartbeat
    from pipeline.search.storage import resolve_storage, sqlite_storage
    from pipeline.search.trials import SearchJob

    search = recipe.search
    adapters = {name: inputs.adapter_dir(name) for name in inputs.adapters.names}
    for path in adapters.values():
        verify_adapter(path)
    metric = search.metric if search.metric != "auto" else ("exact_match" if recipe.evaluate.generate else "loss")
    sets, evaluation = _sets(recipe, inputs, work_dir, generate=metric == "exact_match")
    shutil.rmtree(work_dir, ignore_errors=True)  # the rendered retention sets are in `sets` now
    return SearchJob(
        base_dir=resolve_model_once(recipe.base_model, "base_model", recipe.trust_remote_code),
        target_dir=resolve_model_once(recipe.target_model, "target_model", recipe.trust_remote_code),
        adapters=adapters,
        adapted_paths=adapted_model_names(recipe, list(adapters)),
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
        storage=resolve_storage(search.storage) if search.storage else sqlite_storage(default_db),
        study_name=study_name(recipe, inputs),
        lock_path=lock_path,
        heartbeat=Heartbeat(search.heartbeat_interval, search.grace_period),
        device=recipe.merge.device,
        trust_remote_code=recipe.trust_remote_code,
        cache_bytes=int(search.cache_gb * 1024**3),
        settings=recipe.merge.model_dump(exclude=set(SEARCHED_KEYS) | {"adapters"}),
    )


def study_name(recipe: Recipe, inputs: Inputs) -> str:
    """The same on every machine for the same recipe and inputs: the stage's config (whose result-neutral settings,
    `merge.device` among them, are left out already), the models by content, every adapter's sha256 (from its
    manifest) and the held-out splits' content; no path, no file time."""
    from pipeline.archive.store import read_manifest
    from pipeline.search import identity

    settings = config(recipe, "")
    settings["base"] = identity.portable_model_identity(recipe.base_model)
    settings["target"] = identity.portable_model_identity(recipe.target_model)
    adapters = settings["adapters"]
    settings["adapter_files"] = {name: read_manifest(inputs.adapter_dir(name))["files"] for name in adapters}
    settings["held_out"] = {
        name: content_fingerprint(inputs.path("prepare", name) / "eval") for name in learned_sets(recipe)
    }
    return identity.study_name(recipe.name, settings)


def say_storage(recipe: Recipe, job) -> None:
    """Where the study is, on the screen when it is a database (its password masked), and a warning when the recipe
    spells that password out."""
    from pipeline.search.storage import has_literal_password

    if not job.storage.shared:
        return
    console.say(f"search: study {job.study_name} on {job.storage.display}")
    if has_literal_password(recipe.search.storage):
        console.say(
            "warning: search.storage holds a password in the recipe; give it from the environment instead, "
            "e.g. search.storage: ${FTMERGE_SEARCH_STORAGE}"
        )


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
    from pipeline.data import templates
    from pipeline.evaluation.evaluate import chat_evaluation
    from pipeline.evaluation.sets import held_out_set, retention_sets

    limit = recipe.search.max_samples
    chat = templates.chat_format(recipe.chat_template, recipe.base_model, recipe.target_model, recipe.trust_remote_code)
    sets = [held_out_set(name, inputs.path("prepare", name), limit) for name in learned_sets(recipe)]
    sets += retention_sets(
        recipe.evaluate.retention,
        chat,
        work_dir,
        max_length=recipe.train.max_seq_length,
        max_samples=limit,
        names=set(kept_sets(recipe)),
    )
    evaluation = chat_evaluation(
        recipe.evaluate, chat, trust_remote_code=recipe.trust_remote_code, adapter_dtype=recipe.apply.dtype
    )
    return sets, replace(evaluation, config=evaluation.config.model_copy(update={"generate": generate}))


STAGE = Stage(name="search", items=items, config=config, depends_on=depends_on, check=check, run=run, resumable=True)
