"""Processes that stand for machines: each gets a host name of its own (a UTS namespace, `unshare --uts`, where this
user may make one: root here and in CI) and shares nothing with the others but what the test hands it."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from helpers.cli import REPO
from helpers.recipes import RETENTION, TINY_TRAIN
from pipeline.search.coordination import Heartbeat
from pipeline.search.storage import Storage
from pipeline.search.study import open_study


@functools.cache
def can_name_hosts() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--uts", "hostname", "probe"], capture_output=True).returncode == 0


def on_machine(name: str, command: list[str]) -> list[str]:
    """`command` run under the host name `name` (unchanged where host names cannot be set: see can_name_hosts)."""
    if not can_name_hosts():
        return command
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *command]


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
        "train": {**TINY_TRAIN, "max_steps": 3, "save_steps": 3},
        "apply": {"dtype": "bfloat16", "save": False},
        "merge": {"engine": "fused"},
        "search": {
            "trials": trials,
            "max_samples": 4,
            "metric": "loss",
            "retention_tolerance": 0.5,
            "fallback": "published",
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


def study_trials(url: str):
    from optuna.study import get_all_study_names

    storage = Storage(url)
    (name,) = get_all_study_names(storage=url)
    return open_study(storage, name, Heartbeat(1, 6)).get_trials(deepcopy=False)
