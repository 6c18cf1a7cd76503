"""`python -m pipeline.run RECIPE`: run every stage that is not done, or the ones asked for.

Exit codes: 0 success, 2 bad recipe or arguments (nothing ran), 1 a stage failed (the message names stage and item).
The notebook calls `run_recipe` with the recipe it loaded, so the CLI and the notebook share one code path.
The screen gets one line per step, progress bars and the results; the libraries' output goes to
`<output_dir>/logs/run-*.log` (`--verbose`: to the screen too).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipeline import __version__, console, distributed, locking, runner
from pipeline.archive.store import ArchiveError
from pipeline.errors import ConfigProblem
from pipeline.models.hub import ModelNotFound
from pipeline.recipe import Recipe, RecipeError, load_recipe, recipe_renames
from pipeline.search.storage import mask_url_passwords
from pipeline.stages import ENABLED_BY, STAGES

T = TypeVar("T")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """`--set` and `--verbose`, as every command that runs a recipe takes them."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.max_steps=10 (repeatable)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' output on the screen too (it is always in <output_dir>/logs/)",
    )


def command_recipe(
    args: argparse.Namespace, ready: Callable[[Recipe], T] = lambda recipe: None
) -> tuple[Recipe, T] | None:
    """The command's recipe (`args.recipe` with its `--set`s) and what `ready` makes of it before anything runs. A
    bad recipe, a missing file or a damaged archive is printed as one line, and None returned: the command exits
    2."""
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        return recipe, ready(recipe)
    except (RecipeError, FileNotFoundError, ArchiveError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def parse_args(argv: list[str] | None, prog: str = "python -m pipeline.run") -> argparse.Namespace:
    """The command's arguments; `ftmerge run` passes its own `prog`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe YAML, e.g. recipes/tiny_cpu.yaml")
    parser.add_argument("--stage", action="append", choices=list(STAGES), help="run only this stage (repeatable)")
    parser.add_argument("--from", dest="from_stage", choices=list(STAGES), help="run this stage and the ones after")
    parser.add_argument("--force", action="store_true", help="redo the selected stages even if they are done")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; loads no model")
    parser.add_argument("--status", action="store_true", help="print the state of every step and exit")
    add_recipe_options(parser)
    parser.add_argument("--version", action="version", version=f"ftmerge {__version__}")
    args = parser.parse_args(argv)
    if args.stage and args.from_stage:
        parser.error("--stage and --from cannot be combined")
    if args.status and (args.force or args.dry_run or args.stage or args.from_stage):
        parser.error("--status shows every step and runs nothing; --force, --dry-run, --stage and --from do not apply")
    return args


def print_table(
    recipe: Recipe, steps: list[runner.Step], selected: list[runner.Step] | None = None, force: bool = False
) -> None:
    """The step table of --status and --dry-run: stage, item, state, fingerprint, time, output."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe.name}: {recipe.output_dir}", title_justify="left")
    for column in ("stage", "item", "state", "fingerprint", "time", "output"):
        table.add_column(column, overflow="fold")
    if selected is not None:
        table.add_column("plan")
    chosen = {id(s) for s in selected or ()}
    for step, status in zip(steps, runner.status_rows(recipe, steps), strict=True):
        seconds = status["seconds"]
        row = [
            status["stage"],
            status["item"] or "-",
            status["state"],
            status["fingerprint"],
            f"{seconds:.1f}s" if seconds is not None else "",
            status["output"],
        ]
        if selected is not None:
            row.append("run" if id(step) in chosen and (force or not runner.is_done(recipe, step)) else "skip")
        table.add_row(*row)
    Console(width=200).print(table)


def main(argv: list[str] | None = None, prog: str = "python -m pipeline.run") -> int:
    args = parse_args(argv, prog)
    loaded = command_recipe(args)
    if loaded is None:
        return 2
    recipe, _ = loaded
    return run_recipe(
        recipe,
        stages=args.stage,
        from_stage=args.from_stage,
        force=args.force,
        dry_run=args.dry_run,
        status=args.status,
        verbose=args.verbose,
    )


def run_recipe(
    recipe: Recipe,
    *,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    status: bool = False,
    verbose: bool = False,
) -> int:
    """Everything the command does after loading the recipe, for the CLI and the notebook alike: prints what it
    does and any error, and returns the exit code."""
    try:
        steps, selected = _plan(recipe, stages, from_stage)
        if status:
            print_table(recipe, steps)
            return 0
        for text in recipe_notices(recipe):
            print(f"note: {text}")
        if distributed.world_size() > 1 and {s.stage.name for s in selected} != {"train"}:
            raise RecipeError(
                "under accelerate launch / torchrun only `--stage train` runs; run the other stages in a single process"
            )
        runner.check(recipe, [s for s in selected if force or not runner.is_done(recipe, s)], steps)
        if dry_run:
            print_table(recipe, steps, selected, force)
            print("dry run: recipe is valid; nothing was loaded or written")
            return 0
    except (RecipeError, ArchiveError, ConfigProblem, ModelNotFound) as error:
        print(f"error: {error}{_hint(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug of ftmerge's, not a problem of the recipe
        return _bug(error)
    return _execute(recipe, steps, selected, force=force, verbose=verbose)


def _plan(
    recipe: Recipe, stages: list[str] | None, from_stage: str | None
) -> tuple[list[runner.Step], list[runner.Step]]:
    """Every step, and those the command line selects. A `--stage` the recipe does not enable is an error (there is
    nothing to run); a `--from` stage it does not enable is said, and the run starts at the next one."""
    steps = runner.plan(recipe)
    planned = {step.stage.name for step in steps}
    off = [name for name in stages or [] if name not in planned]
    if off:
        raise RecipeError(
            "; ".join(f"stage {name} is not enabled by this recipe (it runs with {ENABLED_BY[name]})" for name in off)
        )
    if from_stage and from_stage not in planned:
        print(
            f"note: stage {from_stage} is not enabled by this recipe (it runs with {ENABLED_BY[from_stage]}); "
            "starting at the next stage it enables"
        )
    return steps, runner.select(steps, stages, from_stage)


def recipe_notices(recipe: Recipe) -> list[str]:
    """What the recipe asks for that a user must know before anything runs."""
    notices = list(recipe_renames(recipe))
    if recipe.trust_remote_code:
        notices.append(
            "trust_remote_code is on: Python code from the models' repositories will run on this machine "
            "(the recipe says so); leave it off unless you trust that code"
        )
    return notices


def _execute(
    recipe: Recipe, steps: list[runner.Step], selected: list[runner.Step], *, force: bool, verbose: bool
) -> int:
    started = time.time()
    main = distributed.is_main_process()
    echo = console.say if main else (lambda *_: None)
    # One run per output_dir, and per archived adapter it may write (recipes can share an archive); rank 0 holds them.
    shared = [s.output for s in selected if s.stage.write_once and (force or not runner.is_done(recipe, s))]
    locks = locking.run_locks(recipe.output_dir, shared) if main else contextlib.nullcontext()
    quiet = (
        console.run_console(recipe.output_dir, verbose=verbose, command=mask_url_passwords(" ".join(sys.argv)))
        if main
        else contextlib.nullcontext()
    )
    with quiet as log:
        try:
            with locks:
                runner.execute(recipe, steps, selected, force=force, echo=echo)
        except (runner.StageFailed, locking.LockHeld) as error:
            return _failed(error, log, 1)
        except RecipeError as error:
            return _failed(error, log, 2)
        _show_results(steps, echo)
        merged = next((s.output for s in steps if s.stage.name == "merge"), None)
        echo(
            f"finished in {time.time() - started:.1f}s"
            + (f"; merged model: {merged}" if merged and merged.exists() else "")
        )
    return 0


def _failed(error: Exception, log: Path | None, code: int) -> int:
    """The notices the failed step raised, then one line naming the stage, the item and the log; the traceback goes to
    the log."""
    traceback.print_exception(error, file=sys.stderr)
    runner.show_notices(console.say)
    console.say(
        f"error: {error}" + (f" (traceback: {log})" if log and isinstance(error, runner.StageFailed) else ""),
        error=True,
    )
    return code


def _hint(message: str) -> str:
    """What to do about an error whose fix is not in the recipe: the demo's models are built, not shipped."""
    from pipeline.demo import DEMO_MODELS

    if str(DEMO_MODELS) in message and "not found" in message:
        return (
            f"\nThe demo's models are built on this machine, not shipped: run `make demo` (or `python -m "
            f"pipeline.demo.lineage {DEMO_MODELS}`) once in the directory the recipe runs from."
        )
    return ""


def _bug(error: Exception) -> int:
    """An error no user input explains: one line saying so, the traceback in a file to report, exit 1."""
    details = error.traceback if isinstance(error, runner.CheckFailed) else traceback.format_exc()
    with tempfile.NamedTemporaryFile("w", prefix="ftmerge-error-", suffix=".log", delete=False) as file:
        file.write(details)
    print(
        f"error: {error} — a bug in ftmerge, not in the recipe; please report it with the traceback in {file.name}",
        file=sys.stderr,
    )
    return 1


def _show_results(steps: list[runner.Step], echo) -> None:
    """The evaluate report's table and llama.cpp's check of the GGUF files, when there are: what the run was for, at
    the end where it is seen."""
    from pipeline.evaluation.report import REPORT_MD, read_report_tables
    from pipeline.llama_cpp.verify import VERIFICATION_FILE, read_verification

    evaluate_dir = next((s.output for s in steps if s.stage.name == "evaluate"), None)
    tables = read_report_tables(evaluate_dir) if evaluate_dir is not None else None
    if tables:
        echo(f"results ({evaluate_dir / REPORT_MD}):\n{tables}")
    exported = next((s.output for s in steps if s.stage.name == "export"), None)
    verification = read_verification(exported) if exported is not None and exported.is_dir() else None
    if verification is not None:
        lines = [f"  {f['file']}: {f['summary']}" for f in verification.get("files", {}).values() if f.get("kept")]
        echo(
            f"GGUF files, run by llama.cpp ({exported / VERIFICATION_FILE}):\n" + "\n".join(lines)
            if verification["verified"]
            else f"GGUF files not verified by llama.cpp: {verification['reason']}"
        )


if __name__ == "__main__":
    sys.exit(main())
