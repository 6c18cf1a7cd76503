"""`ftmerge search-worker` on three "machines" that share nothing but a PostgreSQL database, as a user runs it: one
machine prepares, trains and archives; three others, each with its own copy of the recipe's inputs (models copied
without their file times, the archive, the prepared splits; not the raw fine-tune data), its own working directory
and its own host name, work the study; the coordinating run then writes the leaderboard and merges the best passing
trial. The database's password comes from the environment and is found in no file and no output.
Tiny real models (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.machines import can_name_hosts, on_machine
from test_search import RETENTION

from pipeline.search.coordination import Heartbeat
from pipeline.search.storage import Storage
from pipeline.search.study import choose, open_study

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRIALS = 6
MACHINES = ("machine-0", "machine-1", "machine-2")


def recipe_text(trials: int = TRIALS, search: dict | None = None, evaluate: dict | None = None) -> str:
    """One recipe for every machine, with paths relative to where it runs and the database from the environment;
    `search` and `evaluate` update those blocks (bench/search_workers.py scores trials as the demo does)."""
    retention = json.loads(json.dumps(RETENTION))
    retention["retention"][0]["dataset"]["path"] = "data/copy.messages.jsonl"
    recipe = {
        "name": "multi",
        "output_dir": "run",
        "archive_dir": "archive",
        "base_model": "models/base",
        "target_model": "models/target",
        "finetunes": [
            {
                "name": name,
                "dataset": {"path": f"data/{file}", "format": kind, "max_samples": 48, "eval_size": 6},
            }
            for name, file, kind in (
                ("reverse", "reverse.alpaca.jsonl", "alpaca"),
                ("sort", "sort.messages.jsonl", "messages"),
            )
        ],
        "train": {
            "backend": "unsloth",
            "max_seq_length": 64,
            "load_in_4bit": False,
            "lora": {"r": 8, "alpha": 16},
            "max_steps": 3,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 0,
            "learning_rate": 1e-2,
            "optim": "adamw_torch",
            "save_steps": 3,
            "logging_steps": 1,
        },
        "apply": {"dtype": "bfloat16", "save": False},
        "merge": {"engine": "fused"},
        "search": {
            "trials": trials,
            "max_samples": 4,
            "metric": "loss",
            "retention_tolerance": 0.5,
            "fallback": "seed",
            "storage": "${FTMERGE_SEARCH_STORAGE}",
            "heartbeat_interval": 1,
            "grace_period": 6,
            "space": {"methods": ["ties", "task_arithmetic", "linear"]},
            **(search or {}),
        },
        "evaluate": {"enabled": False, "max_samples": 8, "batch_size": 4, **retention, **(evaluate or {})},
    }
    return yaml.safe_dump(recipe, sort_keys=False)


def copy_without_times(source: Path, destination: Path) -> None:
    """As another machine receives files: same bytes, new paths, new modification times."""
    shutil.copytree(source, destination, copy_function=shutil.copyfile)


def cli(directory: Path, *args: str, url: str, machine: str | None = None, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.Popen(
        on_machine(machine, command) if machine else command,
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "FTMERGE_SEARCH_STORAGE": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finished(process: subprocess.Popen, timeout: float = 600) -> dict:
    stdout, stderr = process.communicate(timeout=timeout)
    return {"code": process.returncode, "stdout": stdout, "stderr": stderr}


def set_up_machines(root: Path, models: dict, finetune_sets: Path, recipe: str, machines=MACHINES) -> dict:
    """The coordinating machine after prepare, train and archive; worker machines with copies of its inputs."""
    coordinator = root / "coordinator"
    (coordinator / "data").mkdir(parents=True)
    for name, path in models.items():
        shutil.copytree(path, coordinator / "models" / name)
    for file in ("reverse.alpaca.jsonl", "sort.messages.jsonl"):
        shutil.copy(finetune_sets / file, coordinator / "data" / file)
    shutil.copy(REPO / "data_templates/demo/copy.messages.jsonl", coordinator / "data" / "copy.messages.jsonl")
    (coordinator / "recipe.yaml").write_text(recipe)
    args = ("run", "recipe.yaml", "--stage", "prepare", "--stage", "train", "--stage", "archive")
    upstream = finished(cli(coordinator, *args, url="unused"))
    assert upstream["code"] == 0, upstream["stdout"] + upstream["stderr"]
    workers = []
    for machine in machines:
        directory = root / machine
        (directory / "data").mkdir(parents=True)
        shutil.copy(coordinator / "recipe.yaml", directory / "recipe.yaml")
        shutil.copy(coordinator / "data" / "copy.messages.jsonl", directory / "data" / "copy.messages.jsonl")
        copy_without_times(coordinator / "models", directory / "models")
        copy_without_times(coordinator / "archive", directory / "archive")
        copy_without_times(coordinator / "run" / "prepare", directory / "run" / "prepare")
        workers.append(directory)
    return {"root": root, "coordinator": coordinator, "workers": workers}


@pytest.fixture(scope="module")
def machines(tmp_path_factory, tiny_models, finetune_sets, postgres):
    return set_up_machines(tmp_path_factory.mktemp("machines"), tiny_models, finetune_sets, recipe_text())


def study_trials(url: str):
    from optuna.study import get_all_study_names

    storage = Storage(url)
    (name,) = get_all_study_names(storage=url)
    return open_study(storage, name, Heartbeat(1, 6)).get_trials(deepcopy=False)


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
    assert board["chosen"] == (best["label"] if best else "seed")
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
    assert rerun.params == failed[0].params == running[0].params


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
