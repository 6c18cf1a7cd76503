"""`ftmerge search-worker RECIPE`: work trials of the recipe's search study on this machine, beside the workers of
other machines, until the study holds `search.trials` finished trials; runs no stage and writes nothing but its log.

The study is in the database of `search.storage` (PostgreSQL), which is all the machines share. A worker needs what
the search stage reads, at the paths the recipe names (relative to where it runs): the base and target models, the
archived adapters, the prepared held-out splits (`<output_dir>/prepare/<fine-tune>/eval`) and the retention sets'
files. Copy them from the machine that ran prepare, train and archive, or mount them. Their content names the study
(`pipeline.search.identity`), so every machine with the same recipe and inputs joins the same one.

The coordinating run (`python -m pipeline.run RECIPE`) works trials too, then, once the study is full, writes the
leaderboard; its merge stage writes the best passing trial. A worker that dies leaves its trial running until its
heartbeat is `search.grace_period` seconds old; then another worker fails it and runs it again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from pipeline import console
from pipeline.recipe import Recipe, RecipeError
from pipeline.run import add_recipe_options, command_recipe
from pipeline.stages.contract import Inputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftmerge search-worker", description=__doc__.splitlines()[0])
    parser.add_argument(
        "recipe",
        help="the recipe the coordinating run uses (its search: block names the database); with --set, the study's "
        "settings must stay the other machines'",
    )
    add_recipe_options(parser)
    return parser.parse_args(argv)


def worker_inputs(recipe: Recipe) -> Inputs:
    """The outputs the search reads, where the recipe puts them; a RecipeError listing each one missing here."""
    from pipeline.runner import inputs_of

    if recipe.search is None:
        raise RecipeError("the recipe has no search: block, so there is no study to work on")
    from pipeline.search.storage import StorageError, resolve_storage

    if recipe.search.storage is None:
        raise RecipeError(
            "search.storage is not set: a worker joins a study in a database that every machine reaches "
            "(search.storage: postgresql://…); on one machine, search.workers runs several processes"
        )
    try:
        storage = resolve_storage(recipe.search.storage)
    except StorageError as error:
        raise RecipeError(f"search.storage: {error}") from None
    if not storage.shared:
        raise RecipeError(
            "search.storage: a worker joins a study on a database server (postgresql://…), whose lock and "
            "heartbeats reach every machine; a SQLite file is one machine's (search.workers runs several processes)"
        )
    inputs = inputs_of(recipe, "search")
    missing = [
        f"  prepared held-out split of {ref.item}: {path / 'eval'}"
        for ref, path in inputs.paths.items()
        if ref.stage == "prepare" and not (path / "eval").is_dir()
    ]
    for name in inputs.adapters.names:
        manifest = inputs.adapter_dir(name) / "manifest.json"
        if not manifest.is_file():
            missing.append(f"  archived adapter {name}: {manifest}")
    if missing:
        raise RecipeError(
            "this machine lacks inputs of the search; copy them from the machine that ran prepare, train and archive "
            "(same paths, relative to where this runs), or mount them:\n" + "\n".join(missing)
        )
    return inputs


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.search import STAGE

    def ready(recipe: Recipe) -> Inputs:
        inputs = worker_inputs(recipe)
        STAGE.check(recipe, "")
        return inputs

    args = parse_args(argv)
    loaded = command_recipe(args, ready)
    if loaded is None:
        return 2
    recipe, inputs = loaded
    with console.run_console(recipe.output_dir, verbose=args.verbose, command="ftmerge search-worker") as log:
        try:
            done, total = work_here(recipe, inputs)
        except Exception as error:
            traceback.print_exc()  # to the log
            console.say(f"error: search-worker: {type(error).__name__}: {error} (traceback: {log})", error=True)
            return 1
        console.say(
            f"search-worker: the study holds its {total} finished trials, {done} of them from this machine; "
            "the coordinating run's search stage writes the leaderboard"
        )
    return 0


def work_here(recipe: Recipe, inputs: Inputs) -> tuple[int, int]:
    """(trials finished here, the study's count)."""
    from pipeline.search.study import other_studies
    from pipeline.search.trials import work_in_parallel
    from pipeline.stages.search import say_storage, search_job

    with tempfile.TemporaryDirectory(prefix="ftmerge-search-worker-") as scratch:
        job = search_job(recipe, inputs, Path(scratch) / "sets", Path(scratch) / "study.lock")
    say_storage(recipe, job)
    others = other_studies(job.storage, job.study_name, prefix=f"{recipe.name}-")
    if others:
        console.say(
            f"search-worker: the database also holds {', '.join(others)} of this recipe: if the coordinating run "
            "works one of those, this machine's inputs (models, archive, prepared splits) or settings differ from its"
        )
    return work_in_parallel(job, recipe.search.workers, say=console.say), job.total


if __name__ == "__main__":
    sys.exit(main())
