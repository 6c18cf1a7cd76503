"""`ftmerge search-worker` on three "machines" that share nothing but a PostgreSQL database, as a user runs it: one
machine prepares, trains and archives; three others, each with its own copy of the recipe's inputs (models copied
without their file times, the archive, the prepared splits; not the raw fine-tune data), its own working directory
and its own host name, work the study; the coordinating run then writes the leaderboard and merges the best passing
trial. The database's password comes from the environment and is found in no file and no output.
Tiny real models (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
import yaml
from helpers.machines import (
    MACHINES,
    TRIALS,
    can_name_hosts,
    cli,
    finished,
    recipe_text,
    set_up_machines,
    study_trials,
)

from pipeline.search.study import choose

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def machines(tmp_path_factory, tiny_models, finetune_sets, postgres):
    return set_up_machines(tmp_path_factory.mktemp("machines"), tiny_models, finetune_sets, recipe_text())


def test_three_worker_machines_fill_the_study_and_the_merge_writes_its_best_passing_trial(machines, postgres):
    url = postgres.new_database()
    started = time.monotonic()
    workers = [
        cli(directory, "search-worker", "recipe.yaml", url=url, machine=machine)
        for directory, machine in zip(machines["workers"], MACHINES, strict=True)
    ]
    outcomes = [finished(worker) for worker in workers]
    workers_seconds = time.monotonic() - started
    for outcome in outcomes:
        assert outcome["code"] == 0, outcome["stdout"] + outcome["stderr"]
        assert "search-worker: the study holds its 6 finished trials" in outcome["stdout"]
    trials = study_trials(url)
    assert [trial.state.name for trial in trials] == ["COMPLETE"] * TRIALS  # exactly its count, none failed
    assert [trial.number for trial in trials] == list(range(TRIALS))
    assert len({trial.user_attrs["worker"] for trial in trials}) >= 2  # the machines shared the work
    if can_name_hosts():
        assert {trial.user_attrs["worker"].split(":")[0] for trial in trials} <= set(MACHINES)
    assert all(set(trial.user_attrs) >= {"learned.reverse", "learned.sort", "kept.copy"} for trial in trials)

    coordinator = machines["coordinator"]
    started = time.monotonic()
    run = finished(cli(coordinator, "run", "recipe.yaml", url=url))
    coordinator_seconds = time.monotonic() - started
    assert run["code"] == 0, run["stdout"] + run["stderr"]
    print(f"\n3 workers, {TRIALS} trials: {workers_seconds:.1f}s; coordinator search+merge: {coordinator_seconds:.1f}s")
    board = json.loads((coordinator / "run" / "search" / "leaderboard.json").read_text())
    assert [row["number"] for row in board["trials"]] == list(range(TRIALS))
    best = choose(board["trials"])
    assert board["chosen"] == (best["label"] if best else "published")
    chosen = next(row for row in board["trials"] if row["label"] == board["chosen"])
    written = yaml.safe_load((coordinator / "run" / "merge" / "mergekit_config.yml").read_text())
    assert written == chosen["mergekit_config"]  # the merge stage wrote the study's best passing trial
    log = max((coordinator / "run" / "logs").glob("run-*.log"), key=lambda path: path.stat().st_mtime).read_text()
    assert "search: trial" not in log  # the study was full: the coordinating run scored nothing itself
    assert "postgresql://postgres:***@127.0.0.1" in run["stdout"]  # where the study is, its password masked

    leaks = [
        str(path)
        for path in machines["root"].rglob("*")
        if path.is_file() and postgres.password.encode() in path.read_bytes()
    ]
    outputs = [text for outcome in [*outcomes, run] for text in (outcome["stdout"], outcome["stderr"])]
    assert not leaks, f"the database password was written to {leaks}"
    assert not [text for text in outputs if postgres.password in text], "the database password was printed"


def test_a_worker_killed_mid_trial_is_redone_by_another_and_counted_once(machines, postgres):
    url = postgres.new_database()
    workers = [
        cli(directory, "search-worker", "recipe.yaml", url=url, machine=machine)
        for directory, machine in zip(machines["workers"][:2], MACHINES[:2], strict=True)
    ]
    victim = workers[0]
    deadline = time.monotonic() + 300
    running = []
    while not running:  # a trial the first machine's worker is scoring right now
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.2)
        try:
            trials = study_trials(url)
        except ValueError:  # the study does not exist yet
            continue
        running = [  # its parameters suggested: it is being scored
            t
            for t in trials
            if t.state.name == "RUNNING" and t.params and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
        ]
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    for worker in workers[1:]:
        outcome = finished(worker)
        assert outcome["code"] == 0, outcome["stdout"] + outcome["stderr"]
    trials = study_trials(url)
    failed = [trial for trial in trials if trial.state.name == "FAIL"]
    assert [trial.number for trial in failed] == [running[0].number]
    assert sum(trial.state.name == "COMPLETE" for trial in trials) == TRIALS

    coordinator = machines["coordinator"]
    run = finished(cli(coordinator, "run", "recipe.yaml", "--stage", "search", "--force", url=url))
    assert run["code"] == 0, run["stdout"] + run["stderr"]
    board = json.loads((coordinator / "run" / "search" / "leaderboard.json").read_text())
    assert len(board["trials"]) == TRIALS
    retried = [row for row in board["trials"] if row.get("retry_of") == running[0].number]
    assert len(retried) == 1  # the killed trial's rerun, once; the killed trial itself is no row
    assert running[0].number not in [row["number"] for row in board["trials"]]
    rerun = next(trial for trial in trials if trial.number == retried[0]["number"])
    # The kill can land between two suggestions (each is written as it is made): the retry keeps every parameter
    # the killed trial had and suggests any missing ones.
    assert failed[0].params.items() >= running[0].params.items()
    assert rerun.params.items() >= failed[0].params.items()


def test_a_worker_without_the_searchs_inputs_says_what_to_copy(machines, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(machines["coordinator"] / "recipe.yaml", bare / "recipe.yaml")
    shutil.copytree(machines["coordinator"] / "archive", bare / "archive")
    result = finished(cli(bare, "search-worker", "recipe.yaml", url="postgresql://nobody@127.0.0.1:1/none"))
    assert result["code"] == 2, result
    assert "this machine lacks inputs of the search" in result["stderr"]
    assert "prepared held-out split of reverse: run/prepare/reverse/eval" in result["stderr"]
    assert "Traceback" not in result["stderr"] and not (bare / "run").exists()
