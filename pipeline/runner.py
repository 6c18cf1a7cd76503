"""Stage order, fingerprints, skip/resume, atomic outputs and state: everything that is not about LLMs.

A step (one stage, one item) is done when its state file says so, its fingerprint matches and its output exists.
A fingerprint hashes the stage's config with the fingerprints of the steps it reads from, so editing an upstream
setting invalidates everything downstream and nothing upstream. Outputs are written to `<output>.partial/` and
renamed into place when complete; a killed run never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import console, distributed
from pipeline.files import read_json, write_json_atomic
from pipeline.fingerprint import hash_json
from pipeline.locking import alive_here
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import STAGES
from pipeline.stages.contract import FINGERPRINT_FILE, Inputs, Stage, StageRef
from pipeline.stages.selection import AdapterSet, adapter_set

PARTIAL_SUFFIX = ".partial"


class StageFailed(RuntimeError):
    """A stage raised while running; the message names the stage and the item."""


class CheckFailed(RuntimeError):
    """A stage's `check` raised something other than a RecipeError: a bug in ftmerge, not a problem of the recipe.
    The message names the step; the traceback is kept in `traceback`."""

    def __init__(self, message: str, traceback_text: str):
        super().__init__(message)
        self.traceback = traceback_text


@dataclass
class Step:
    stage: Stage
    item: str
    fingerprint: str
    output: Path
    depends_on: list[StageRef] = field(default_factory=list)
    adapters: AdapterSet | None = None  # the plan's, shared by every step

    def inputs(self, outputs: dict[StageRef, Path]) -> Inputs:
        """What the step reads: the outputs of what it declared, and the plan's adapter set."""
        return Inputs({dependency: outputs[dependency] for dependency in self.depends_on}, self.adapters)

    @property
    def ref(self) -> StageRef:
        return StageRef(self.stage.name, self.item)

    @property
    def label(self) -> str:
        return self.ref.label


def state_path(recipe: Recipe, stage: str, item: str) -> Path:
    return Path(recipe.output_dir) / "state" / (f"{stage}.{item}.json" if item else f"{stage}.json")


def read_state(recipe: Recipe, stage: str, item: str) -> dict:
    state = read_json(state_path(recipe, stage, item))
    return state if isinstance(state, dict) else {}


def plan(recipe: Recipe, stages: dict[str, Stage] | None = None) -> list[Step]:
    """Every step of every stage, in run order, with fingerprints computed from the recipe and the inputs on disk.
    The adapter set is resolved once, here: the stages' planning functions read this value, and every step's run
    is handed it, so what ran is what was fingerprinted even when a step archives new adapters meanwhile."""
    stages = STAGES if stages is None else stages
    adapters = adapter_set(recipe)
    fingerprints: dict[StageRef, str] = {}

    def fingerprint(ref: StageRef) -> str:
        if ref not in fingerprints:
            stage = stages[ref.stage]
            upstream = {f"{r.stage}:{r.item}": fingerprint(r) for r in stage.depends_on(recipe, ref.item)}
            fingerprints[ref] = hash_json(
                {"stage": ref.stage, "config": stage.config(recipe, ref.item), "inputs": upstream}
            )
        return fingerprints[ref]

    return [
        Step(
            stage,
            item,
            fingerprint(StageRef(stage.name, item)),
            Path(stage.output_path(recipe, item)),
            list(stage.depends_on(recipe, item)),
            adapters,
        )
        for stage in stages.values()
        for item in stage.items(recipe)
    ]


def check(recipe: Recipe, steps: list[Step], planned: list[Step] | None = None) -> None:
    """Run the cheap validation of `steps` (those that will run) and of where every `planned` step writes, and report
    all problems at once. A check reports a problem of the recipe as a RecipeError; anything else it raises is a bug
    in the check (CheckFailed), never a recipe error."""
    problems = [f"  {problem}" for problem in output_problems(recipe, steps if planned is None else planned)]
    for step in steps:
        try:
            step.stage.check(recipe, step.item)
        except RecipeError as error:
            problems.append(f"  {step.label}: {error}")
        except Exception as error:
            raise CheckFailed(
                f"checking {step.label} failed: {type(error).__name__}: {error}", traceback.format_exc()
            ) from error
        if _conflicts(recipe, step):
            problems.append(
                f"  {step.label}: {step.output} already exists, made from another config or other data (or added by "
                "hand), and is never overwritten. Give this item a new name, or move the existing one away by hand."
            )
    if problems:
        raise RecipeError("the recipe cannot run:\n" + "\n".join(dict.fromkeys(problems)))


RUN_FOLDERS = ("state", "logs", "cache")  # the runner's own, under output_dir


def output_problems(recipe: Recipe, steps: list[Step]) -> list[str]:
    """Where the run will write, checked before anything is: output_dir and archive_dir are (or can be created as)
    directories this user can write, and no step's output is another's, lies inside another's or in the runner's
    own folders (an archive_dir inside a stage's folder would make two stages write one directory)."""
    problems = [
        problem
        for key, path in (("output_dir", Path(recipe.output_dir)), ("archive_dir", Path(recipe.archive_dir)))
        if (problem := _unwritable(key, path))
    ]
    reserved = [Path(recipe.output_dir) / name for name in RUN_FOLDERS]
    owners: dict[Path, str] = {}
    for step in steps:
        output = step.output.absolute()
        for other, label in owners.items():
            if output == other or other in output.parents or output in other.parents:
                relation = "is" if output == other else "overlaps"
                problems.append(
                    f"{step.label}: its output {output} {relation} the output of {label}; keep archive_dir "
                    "outside output_dir's stage folders (the default is <output_dir>/adapters)"
                )
        for folder in reserved:
            if folder.absolute() in (output, *output.parents):
                problems.append(f"{step.label}: its output {output} is inside the run's own {folder.name}/ folder")
        owners[output] = step.label
    return problems


def _unwritable(key: str, path: Path) -> str | None:
    """Why `path` cannot be a directory this process writes, or None."""
    existing = path.absolute()
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except PermissionError:
        return f"{key}: {path} cannot be reached by this user (no permission to enter {existing.parent})"
    if not existing.is_dir():
        return f"{key}: {path} cannot be a directory: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}: {existing} is not writable by this user, so {path} cannot be written"
    return None


def is_done(recipe: Recipe, step: Step) -> bool:
    """Done per this run's state, or, for write-once outputs shared between recipes (the archive), per the
    fingerprint stored beside the output."""
    if _written_fingerprint(step) == step.fingerprint:
        return True
    state = read_state(recipe, step.stage.name, step.item)
    return state.get("status") == "done" and state.get("fingerprint") == step.fingerprint and step.output.exists()


def _conflicts(recipe: Recipe, step: Step) -> bool:
    """A write-once output exists that this step did not make: another fingerprint, or none at all (an adapter added
    with `pipeline.archive add`, or by hand). Found before anything runs, not after hours of training."""
    return (
        step.stage.write_once
        and step.output.exists()
        and _written_fingerprint(step) != step.fingerprint
        and not is_done(recipe, step)
    )


def _written_fingerprint(step: Step) -> str | None:
    marker = step.output / FINGERPRINT_FILE
    return marker.read_text() if step.stage.write_once and marker.is_file() else None


def describe(recipe: Recipe, step: Step) -> str:
    """done | stale (config or inputs changed) | missing (done, output gone) | failed | interrupted | running |
    pending."""
    state = read_state(recipe, step.stage.name, step.item)
    status = state.get("status")
    if _written_fingerprint(step) == step.fingerprint:
        return "done"
    if status == "done":
        if not step.output.exists():
            return "missing"
        return "done" if state.get("fingerprint") == step.fingerprint else "stale"
    if status == "running":
        alive = state.get("host") == socket.gethostname() and alive_here(state)
        return "running" if alive else "interrupted"
    return status or "pending"


def status_rows(recipe: Recipe, steps: list[Step]) -> list[dict]:
    """Every step as data, the rows of `--status`: stage, item, state, fingerprint, seconds, output."""
    return [
        {
            "stage": step.stage.name,
            "item": step.item,
            "state": describe(recipe, step),
            "fingerprint": step.fingerprint[:12],
            "seconds": read_state(recipe, step.stage.name, step.item).get("seconds"),
            "output": str(step.output),
        }
        for step in steps
    ]


def _prepare_partial(step: Step) -> Path:
    """A clean `<output>.partial/`, or the one a killed run left when the stage can resume from it (same
    fingerprint: a changed config never resumes from checkpoints of another)."""
    partial = step.output.with_name(step.output.name + PARTIAL_SUFFIX)
    marker = partial / FINGERPRINT_FILE
    resumable = step.stage.resumable and marker.is_file() and marker.read_text() == step.fingerprint
    if partial.exists() and not resumable:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text(step.fingerprint)
    return partial


def _move_into_place(step: Step, partial: Path) -> None:
    if step.stage.write_once:
        if step.output.exists():
            shutil.rmtree(partial)
            return
    else:
        (partial / FINGERPRINT_FILE).unlink(missing_ok=True)
    previous = step.output.with_name(step.output.name + ".old")
    if previous.exists():
        shutil.rmtree(previous)
    if step.output.exists():
        os.replace(step.output, previous)
    os.replace(partial, step.output)
    if previous.exists():
        shutil.rmtree(previous)


def inputs_of(recipe: Recipe, stage: str, item: str = "") -> Inputs:
    """A step's inputs as the runner hands them to it, without fingerprinting the plan: for processes that read a
    finished run's outputs (the demo's fresh-example check, search workers on other machines, the dashboard), which
    may lack what made those outputs (the raw datasets)."""
    refs = STAGES[stage].depends_on(recipe, item)
    return Inputs({ref: Path(STAGES[ref.stage].output_path(recipe, ref.item)) for ref in refs}, adapter_set(recipe))


def run_step(recipe: Recipe, step: Step, outputs: dict[StageRef, Path]) -> dict:
    """Run one step into its partial directory and rename it into place; record state before and after."""
    stage_name, item = step.stage.name, step.item
    started = time.time()
    main = distributed.is_main_process()
    inputs = step.inputs(outputs)
    try:
        if main:
            write_json_atomic(
                state_path(recipe, stage_name, item),
                {
                    "status": "running",
                    "fingerprint": step.fingerprint,
                    "started": _now(),
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "output": str(step.output),
                },
            )
            partial = _prepare_partial(step)
        else:
            partial = distributed.wait_for_partial(
                step.output.with_name(step.output.name + PARTIAL_SUFFIX), FINGERPRINT_FILE, step.fingerprint
            )
        summary = step.stage.run(recipe, item, partial, inputs) or {}
        if main:
            _move_into_place(step, partial)
    except Exception as error:
        if main:
            _record_failure(recipe, step, started, error)
        raise StageFailed(_failure_message(step, error)) from error
    seconds = time.time() - started
    if main:
        write_json_atomic(
            state_path(recipe, stage_name, item),
            {
                "status": "done",
                "fingerprint": step.fingerprint,
                "started": _iso(started),
                "finished": _now(),
                "seconds": round(seconds, 3),
                "output": str(step.output),
                "summary": summary,
            },
        )
    return {"seconds": seconds, "summary": summary}


def _record_failure(recipe: Recipe, step: Step, started: float, error: BaseException) -> None:
    """Best effort: on a full disk the state file cannot be written either, and the user must still see why the
    stage failed (the `running` state left behind reads as interrupted)."""
    with contextlib.suppress(OSError):
        write_json_atomic(
            state_path(recipe, step.stage.name, step.item),
            {
                "status": "failed",
                "fingerprint": step.fingerprint,
                "started": _iso(started),
                "finished": _now(),
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            },
        )


def _failure_message(step: Step, error: BaseException) -> str:
    where = f"stage {step.stage.name}" + (f", item {step.item}" if step.item else "")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            f"{where}: no space left on device while writing {error.filename or step.output}. Free space and "
            "run again; completed steps are kept and this one restarts cleanly."
        )
    return f"{where}: {type(error).__name__}: {error}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def select(steps: list[Step], stages: list[str] | None = None, from_stage: str | None = None) -> list[Step]:
    """The steps the command line asked for: all, `--stage` names, or `--from` a stage onwards."""
    order = list(dict.fromkeys([*STAGES, *(step.stage.name for step in steps)]))
    wanted = set(order)
    if stages:
        wanted = set(stages)
    if from_stage:
        wanted = set(order[order.index(from_stage) :])
    return [step for step in steps if step.stage.name in wanted]


def execute(recipe: Recipe, steps: list[Step], selected: list[Step], *, force: bool = False, echo=print) -> dict:
    """Run the selected steps in order, skipping those already done; prints one line per step with its time.
    Returns {label: "ran" | "skipped"}."""
    by_ref = {s.ref: s for s in steps}
    outputs = {ref: s.output for ref, s in by_ref.items()}
    chosen = {id(s) for s in selected}
    missing = [
        d.label
        for s in selected
        for d in s.depends_on
        if id(by_ref[d]) not in chosen and not is_done(recipe, by_ref[d])
    ]
    if missing:
        raise RecipeError(
            "inputs not done yet: "
            + ", ".join(dict.fromkeys(missing))
            + ". Run those stages first (or run without --stage)."
        )
    results = {}
    width = max((len(s.label) for s in selected), default=0)
    for step in selected:
        if not force and is_done(recipe, step):
            results[step.label] = "skipped"
            echo(f"{step.label:<{width}}  skipped  (up to date)")
            continue
        with console.progress(step.label):  # a spinner with the elapsed time on a terminal; the line below ends it
            outcome = run_step(recipe, step, outputs)
        results[step.label] = "ran"
        echo(f"{step.label:<{width}}  done     {outcome['seconds']:7.1f}s  {step.output}")
        show_notices(echo)
    return results


def show_notices(echo) -> None:
    """The step's notices (console.notice), under its line."""
    for text in console.take_notices():
        echo(f"  note: {text}")
