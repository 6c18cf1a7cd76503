"""`ftmerge dashboard RECIPE`: optuna-dashboard on the recipe's search study, to watch trials while the search runs
or to browse them after; the `dashboard` extra (`pip install 'ftmerge[dashboard]'`).

The study is the one in `search.storage` (PostgreSQL; its password read from the environment like the search's own,
handed to optuna-dashboard inside this process and never shown), or the run's SQLite study (`search.partial/` while
the search runs, `search/` after). Each trial shows its configuration (Optuna's parameters), its objective, what it
learned and kept of each set (user attributes `learned.<set>`, `kept.<set>`), the process that ran it (`worker` or
`owner`), and the retention gate as its constraint (> 0 breaks it: the dashboard draws such trials as infeasible).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from pipeline.archive.store import ArchiveError
from pipeline.recipe import Recipe, RecipeError
from pipeline.run import command_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftmerge dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="the recipe whose search study to show")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def study_storage(recipe: Recipe):
    """The Storage of the recipe's study: `search.storage`, else the run's SQLite file (the running search's first)."""
    from pipeline.search.storage import StorageError, resolve_storage, sqlite_storage

    if recipe.search is None:
        raise RecipeError("the recipe has no search: block, so there is no study to show")
    if recipe.search.storage is not None:
        try:
            return resolve_storage(recipe.search.storage)
        except StorageError as error:
            raise RecipeError(f"search.storage: {error}") from None
    output = Path(recipe.output_dir)
    for study_db in (output / "search.partial" / "study.db", output / "search" / "study.db"):
        if study_db.is_file():
            return sqlite_storage(study_db)
    raise RecipeError(f"no search study in {output} yet (search/study.db): run the search stage first")


def study_name_here(recipe: Recipe) -> str | None:
    """The name of the recipe's study as the search computes it, when this machine has its inputs."""
    from pipeline.runner import inputs_of
    from pipeline.stages.search import study_name

    try:
        return study_name(recipe, inputs_of(recipe, "search"))
    except (RecipeError, ArchiveError, OSError, KeyError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = command_recipe(args, study_storage)
    if loaded is None:
        return 2
    recipe, storage = loaded
    try:
        import optuna_dashboard
    except ImportError:
        print("error: optuna-dashboard is not installed: pip install 'ftmerge[dashboard]'", file=sys.stderr)
        return 2
    import optuna

    from pipeline.search.storage import StorageError
    from pipeline.search.study import optuna_storage as open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        optuna_storage = open_storage(storage)
        names = optuna.study.get_all_study_names(storage=optuna_storage)
    except StorageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    name = study_name_here(recipe)
    ours = [name] if name in names else [n for n in names if n.startswith(f"{recipe.name}-")]
    base = f"http://{args.host}:{args.port}/dashboard"
    for found in ours:
        study_id = optuna_storage.get_study_id_from_name(found)
        print(f"dashboard: study {found}: {base}/studies/{study_id}", flush=True)
    if not ours:
        print(f"dashboard: no study of {recipe.name} in {storage.display} yet; all studies: {base}", flush=True)
    print(f"dashboard: on {storage.display}; Ctrl-C stops it", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        optuna_dashboard.run_server(optuna_storage, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
