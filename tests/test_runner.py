"""The runner on three small stages that write text files: skipping, invalidation downstream only, atomic outputs,
resumable partial directories and write-once outputs. The real stages are exercised in test_end_to_end.py."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import Inputs, Stage, StageRef

CALLS: list[str] = []


def _stage(name: str, depends: str | None, *, resumable=False, write_once=False, fail_once=None) -> Stage:
    def run(recipe, item, out, inputs):
        CALLS.append(name)
        previous = (out / "progress.txt").read_text() if (out / "progress.txt").exists() else ""
        (out / "progress.txt").write_text(previous + "x")
        if fail_once is not None and not fail_once:
            fail_once.append(True)
            raise RuntimeError("killed")
        upstream = (inputs.path(depends) / "value.txt").read_text() if depends else ""
        (out / "value.txt").write_text(upstream + name)
        return {"resumed": bool(previous)}

    return Stage(
        name=name,
        config=lambda recipe, item: {"setting": recipe.train.learning_rate if name == "b" else 0},
        depends_on=lambda recipe, item: [StageRef(depends)] if depends else [],
        run=run,
        resumable=resumable,
        write_once=write_once,
    )


def _recipe(tmp_path: Path, learning_rate: float = 1e-4) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "toy",
            "output_dir": str(tmp_path),
            "base_model": "org/base",
            "target_model": "org/target",
            "train": {"learning_rate": learning_rate},
        }
    )


def _run(recipe, stages, **kwargs):
    steps = runner.plan(recipe, stages)
    return runner.execute(
        recipe,
        steps,
        runner.select(steps, kwargs.pop("only", None), kwargs.pop("start", None)),
        echo=lambda *_: None,
        **kwargs,
    )


@pytest.fixture
def stages():
    CALLS.clear()
    return {"a": _stage("a", None), "b": _stage("b", "a"), "c": _stage("c", "b")}


def test_second_run_skips_everything(tmp_path, stages):
    recipe = _recipe(tmp_path)
    assert _run(recipe, stages) == {"a": "ran", "b": "ran", "c": "ran"}
    assert (tmp_path / "c" / "value.txt").read_text() == "abc"
    assert _run(recipe, stages) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert CALLS == ["a", "b", "c"]


def test_config_change_reruns_the_stage_and_downstream_only(tmp_path, stages):
    _run(_recipe(tmp_path), stages)
    CALLS.clear()
    changed = _recipe(tmp_path, learning_rate=2e-4)
    assert _run(changed, stages) == {"a": "skipped", "b": "ran", "c": "ran"}
    steps = runner.plan(changed, stages)
    assert [runner.describe(changed, s) for s in steps] == ["done", "done", "done"]
    assert [runner.describe(_recipe(tmp_path), s) for s in runner.plan(_recipe(tmp_path), stages)] == [
        "done",
        "stale",
        "stale",
    ]


def test_force_and_stage_selection(tmp_path, stages):
    recipe = _recipe(tmp_path)
    _run(recipe, stages)
    CALLS.clear()
    assert _run(recipe, stages, only=["b"], force=True) == {"b": "ran"}
    assert _run(recipe, stages, start="b") == {"b": "skipped", "c": "skipped"}
    assert CALLS == ["b"]


def test_missing_upstream_is_refused_before_running(tmp_path, stages):
    with pytest.raises(RecipeError, match="inputs not done yet: a"):
        _run(_recipe(tmp_path), stages, only=["b"])
    assert CALLS == []


def test_failed_step_leaves_no_finished_output_and_resumes_only_when_resumable(tmp_path):
    CALLS.clear()
    stages = {"a": _stage("a", None), "b": _stage("b", "a", resumable=True, fail_once=[])}
    recipe = _recipe(tmp_path)
    with pytest.raises(runner.StageFailed, match="stage b: RuntimeError: killed"):
        _run(recipe, stages)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial" / "progress.txt").exists()
    assert runner.describe(recipe, runner.plan(recipe, stages)[1]) == "failed"
    _run(recipe, stages)
    assert runner.read_state(recipe, "b", "")["summary"] == {"resumed": True}
    assert (tmp_path / "b" / "progress.txt").read_text() == "xx"
    assert not (tmp_path / "b.partial").exists()


def test_partial_of_another_fingerprint_is_discarded(tmp_path):
    CALLS.clear()
    stages = {"a": _stage("a", None), "b": _stage("b", "a", resumable=True, fail_once=[])}
    with pytest.raises(runner.StageFailed):
        _run(_recipe(tmp_path), stages)
    _run(_recipe(tmp_path, learning_rate=3e-4), stages)
    assert (tmp_path / "b" / "progress.txt").read_text() == "x"


def test_write_once_output_is_shared_and_never_replaced(tmp_path):
    CALLS.clear()
    stages = {"a": _stage("a", None), "b": _stage("b", "a", write_once=True)}
    recipe = _recipe(tmp_path)
    _run(recipe, stages)
    (tmp_path / "state" / "b.json").unlink()
    assert _run(recipe, stages) == {"a": "skipped", "b": "skipped"}
    changed = _recipe(tmp_path, learning_rate=5e-4)
    steps = runner.plan(changed, stages)
    with pytest.raises(RecipeError, match="already exists, made from another config"):
        runner.check(changed, steps)
    assert (tmp_path / "b" / "value.txt").read_text() == "ab"


def test_write_once_output_made_elsewhere_is_refused_before_anything_runs(tmp_path):
    CALLS.clear()
    stages = {"a": _stage("a", None), "b": _stage("b", "a", write_once=True)}
    (tmp_path / "b").mkdir(parents=True)
    (tmp_path / "b" / "value.txt").write_text("added by hand")  # no fingerprint beside it: `archive add`, or by hand
    recipe = _recipe(tmp_path)
    with pytest.raises(RecipeError, match=r"b: .* already exists"):
        runner.check(recipe, runner.plan(recipe, stages))
    assert CALLS == []


def test_write_once_output_shared_by_another_run_shows_as_done(tmp_path):
    CALLS.clear()
    stages = {"a": _stage("a", None), "b": _stage("b", "a", write_once=True)}
    recipe = _recipe(tmp_path)
    _run(recipe, stages)
    (tmp_path / "state" / "b.json").unlink()  # this run never wrote it: another recipe sharing the archive did
    assert [runner.describe(recipe, s) for s in runner.plan(recipe, stages)] == ["done", "done"]


def test_full_disk_is_reported_even_when_the_failed_state_cannot_be_written(tmp_path, monkeypatch):
    CALLS.clear()
    stages = {"a": _stage("a", None)}

    def full_disk(recipe, item, out, inputs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "weights.safetensors"))

    def write_state(path, value):
        if value["status"] == "failed":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json_atomic(path, value)

    stages["a"] = dataclasses.replace(stages["a"], run=full_disk)
    write_json_atomic = runner.write_json_atomic
    monkeypatch.setattr(runner, "write_json_atomic", write_state)
    with pytest.raises(runner.StageFailed, match=r"stage a: no space left on device while writing .*weights"):
        _run(_recipe(tmp_path), stages)
    assert runner.read_state(_recipe(tmp_path), "a", "")["status"] == "running"  # read as interrupted once we exit
    assert not list((tmp_path / "state").glob(".*.tmp-*"))


def test_stage_defaults_and_inputs_name_what_is_missing(tmp_path):
    stage = Stage(name="toy", config=lambda recipe, item: {}, run=lambda recipe, item, out, inputs: {})
    recipe = _recipe(tmp_path)
    assert stage.items(recipe) == [""] and stage.depends_on(recipe, "") == [] and stage.check(recipe, "") is None
    assert stage.output_path(recipe, "") == tmp_path / "toy"
    assert stage.output_path(recipe, "x") == tmp_path / "toy" / "x"
    assert not stage.resumable and not stage.write_once
    inputs = Inputs({StageRef("prepare", "ft"): tmp_path / "prepare" / "ft"})
    assert inputs.path("prepare", "ft") == tmp_path / "prepare" / "ft" and inputs.get("merge") is None
    with pytest.raises(KeyError, match=r"merge is not an input of this step \(declared: prepare.ft\)"):
        inputs.path("merge")
