"""The contract between the runner and a stage: a `Stage` value, the `StageRef` of one step, and its `Inputs`.

The runner owns skipping, fingerprints, atomic outputs and state, so a stage only says what it produces and computes
it. A stage module builds one `Stage` from plain functions (no base class, nothing to subclass); tests build one the
same way from lambdas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.recipe import Recipe
    from pipeline.stages.selection import AdapterSet

FINGERPRINT_FILE = ".ftmerge-fingerprint"
"""The runner writes the step's fingerprint here in `out` before `run` (and keeps it beside write-once outputs)."""


@dataclass(frozen=True, order=True)
class StageRef:
    """One step: a stage and an item of it ("" for a stage with a single output)."""

    stage: str
    item: str = ""

    @property
    def label(self) -> str:
        """`stage.item`, or `stage` alone: how the command line, the state files and errors name the step."""
        return f"{self.stage}.{self.item}" if self.item else self.stage


@dataclass(frozen=True)
class Inputs:
    """What a step reads: the output directories of the steps it declared in `depends_on`, and the plan's adapter
    set (resolved once per plan by the runner, the same value the plan's fingerprints were computed from)."""

    paths: Mapping[StageRef, Path] = field(default_factory=dict)
    adapters: AdapterSet | None = None

    def path(self, stage: str, item: str = "") -> Path:
        """The output of a declared input; a KeyError naming it when the step did not declare it."""
        ref = StageRef(stage, item)
        if ref not in self.paths:
            declared = ", ".join(r.label for r in self.paths) or "none"
            raise KeyError(f"{ref.label} is not an input of this step (declared: {declared}); add it to depends_on")
        return Path(self.paths[ref])

    def get(self, stage: str, item: str = "") -> Path | None:
        """The output of an input the step may or may not have declared (None when it did not)."""
        path = self.paths.get(StageRef(stage, item))
        return None if path is None else Path(path)

    def adapter_dir(self, name: str) -> Path:
        """Where an adapter of the plan lies: the output of this recipe's archive step for its own fine-tunes (a
        declared input), the archive entry another recipe wrote for the others."""
        if self.adapters is None:
            raise KeyError(f"adapter {name}: this step was given no adapter set")
        adapter = self.adapters[name]
        return self.path("archive", name) if adapter.own else adapter.directory

    def __contains__(self, ref: object) -> bool:
        return ref in self.paths


def one_output(recipe: Recipe) -> list[str]:
    """The items of a stage with a single output."""
    return [""]


def each_finetune(recipe: Recipe) -> list[str]:
    """The items of a stage with one output per fine-tune, in recipe order."""
    return [finetune.name for finetune in recipe.finetunes]


def no_inputs(recipe: Recipe, item: str) -> list[StageRef]:
    return []


def nothing_to_check(recipe: Recipe, item: str) -> None:
    """The default `check`: nothing the schema and the fingerprint do not already cover."""


@contextlib.contextmanager
def problems_at(key: str = "") -> Iterator[None]:
    """A `check`'s calls into the library: the library's `ConfigProblem` (which locates the problem inside the value
    it was handed) becomes the recipe's problem at `key`, the recipe key that value came from; a model reference
    that cannot be found, the recipe's problem as it says. Anything else is a bug, and the runner says so."""
    from pipeline.errors import ConfigProblem
    from pipeline.models.hub import ModelNotFound
    from pipeline.recipe import RecipeError

    try:
        yield
    except ConfigProblem as problem:
        raise RecipeError(problem.at(key)) from None
    except ModelNotFound as error:
        raise RecipeError(str(error)) from None


@dataclass(frozen=True)
class Stage:
    """A stage as the runner sees it.

    Args:
        name: the stage's name on the command line and in `state/`.
        config: everything that changes the output: the stage's settings and the identity of inputs that no stage
            produced (dataset file content, model fingerprints). Hashed with the inputs' fingerprints.
        run: `run(recipe, item, out, inputs) -> dict` writes the output into `out` (an empty, or resumable,
            temporary directory that the runner renames into place) and returns a JSON-able summary for the state
            file. `inputs` holds exactly the outputs of `depends_on`, and the plan's adapter set.
        items: what the stage produces, e.g. one item per fine-tune; `[""]` for a single output, `[]` when off.
        depends_on: the steps whose outputs this item reads.
        check: cheap validation before anything runs (no model loading, no downloads); raises RecipeError naming
            the key (`problems_at` maps the library's errors). Any other exception is a bug in the check.
        output_path: where the item's output lives; by default `<output_dir>/<name>/<item>` (`<output_dir>/<name>`
            for a single output).
        resumable: keep `<output>.partial/` from a killed run of the same fingerprint (train checkpoints) instead
            of wiping it.
        write_once: an existing output is never replaced (the archive); `run` must refuse a conflict.
    """

    name: str
    config: Callable[[Recipe, str], dict]
    run: Callable[[Recipe, str, Path, Inputs], dict]
    items: Callable[[Recipe], list[str]] = one_output
    depends_on: Callable[[Recipe, str], list[StageRef]] = no_inputs
    check: Callable[[Recipe, str], None] = nothing_to_check
    output_path: Callable[[Recipe, str], Path] | None = None
    resumable: bool = False
    write_once: bool = False

    def __post_init__(self) -> None:
        if self.output_path is None:
            object.__setattr__(self, "output_path", lambda recipe, item: Path(recipe.output_dir) / self.name / item)
