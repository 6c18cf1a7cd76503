"""Benchmark the search across machines: time per trial with 1 and with 3 `ftmerge search-worker` processes on one
PostgreSQL study, and the study's own work per trial on PostgreSQL against SQLite.

    .venv/bin/python bench/search_workers.py [--trials 12] [--max-samples 32]

Builds the tests' tiny models (Qwen2, hidden 64, 2 layers) under a temporary directory with the demo's fine-tune sets,
runs prepare, train and archive once, and starts a throwaway PostgreSQL (tests/helpers/postgres.py) with its durable
defaults (fsync on). Trials are scored as the demo scores them (greedy exact match, 16 new tokens) on `--max-samples`
rows of each set. Then:

- workers: `--trials` trials by 1 worker, then by 3 (each its own copy of the inputs, directory and host name), each
  on a fresh database. "per trial" is the span from the first trial's start to the last one's end over the trial
  count (workers' start-up, the same whatever the count, left out); "median" is one trial's duration.
- bookkeeping: the study's own work per trial (the lock, asking, suggesting, reporting; heartbeats on PostgreSQL)
  with a stand-in objective that takes no time, one process, PostgreSQL against SQLite.

Every figure moves with other work on the machine: the load average is printed beside each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load() -> str:
    return "load " + " ".join(f"{value:.1f}" for value in os.getloadavg())


def build_machines(root: Path, trials: int, max_samples: int) -> dict:
    from helpers.machines import MACHINES, recipe_text, set_up_machines

    from pipeline.demo.synthetic import DEMO_DATA_DIR
    from pipeline.demo.tiny import build_tokenizer, derive_tiny_target, make_tiny_model

    models = root / "models"
    base = make_tiny_model(models / "base", build_tokenizer(models / "tokenizer"), seed=0)
    target = derive_tiny_target(
        base, models / "target", build_tokenizer(models / "target-tokenizer", eos_token="<|im_end|>")
    )
    recipe = recipe_text(
        trials,
        search={"max_samples": max_samples, "metric": "auto", "heartbeat_interval": 5, "grace_period": 30},
        evaluate={"generate": True, "max_new_tokens": 16},
    )
    return set_up_machines(root / "machines", {"base": base, "target": target}, DEMO_DATA_DIR, recipe, MACHINES)


def run_workers(machines: dict, url: str, count: int) -> dict:
    from helpers.machines import MACHINES, can_name_hosts, cli, finished, study_trials

    started = time.monotonic()
    workers = [
        cli(directory, "search-worker", "recipe.yaml", url=url, machine=machine)
        for directory, machine in list(zip(machines["workers"], MACHINES, strict=True))[:count]
    ]
    for worker in workers:
        outcome = finished(worker, timeout=3600)
        assert outcome["code"] == 0, outcome["stdout"] + outcome["stderr"]
    wall = time.monotonic() - started
    trials = [trial for trial in study_trials(url) if trial.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return {
        "wall": wall,
        "per_trial": span / len(trials),
        "median": statistics.median(durations),
        "hosts": len({t.user_attrs["worker"] for t in trials}),
        "named_hosts": can_name_hosts(),
    }


def bookkeeping(url: str, folder: Path, trials: int) -> dict[str, float]:
    """Seconds per trial of the study's own work, stand-in objective, after a warm-up of 4 trials."""
    from helpers.search_standin import SPACE, cheap_point_value

    from pipeline.search.coordination import DatabaseCoordination, FileCoordination, Heartbeat
    from pipeline.search.space import baselines, suggest
    from pipeline.search.storage import Storage, sqlite_storage
    from pipeline.search.study import open_study, run_trials

    heartbeat = Heartbeat(5, 30)
    setups = {
        "sqlite": (sqlite_storage(folder / "study.db"), FileCoordination(folder / "study.lock")),
        "postgresql": (Storage(url), DatabaseCoordination(Storage(url), "bookkeeping", heartbeat)),
    }
    seconds = {}
    for name, (storage, coordination) in setups.items():
        study = open_study(storage, "bookkeeping", heartbeat)
        settings = {
            "baselines": baselines(SPACE.adapters),
            "suggest": lambda trial: suggest(trial, SPACE),
            "evaluate": cheap_point_value,
            "coordination": coordination,
            "seed": 7,
        }
        run_trials(study, total=4, **settings)
        started = time.perf_counter()
        run_trials(study, total=4 + trials, **settings)
        seconds[name] = (time.perf_counter() - started) / trials
    return seconds


def main() -> None:
    from helpers.postgres import running_cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--max-samples", type=int, default=32)
    parser.add_argument("--bookkeeping-trials", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftmerge-bench-workers-") as folder, running_cluster(durable=True) as pg:
        root = Path(folder)
        started = time.monotonic()
        machines = build_machines(root, args.trials, args.max_samples)
        print(f"prepare, train, archive: {time.monotonic() - started:.0f}s ({load()})", flush=True)
        results = {}
        for count in (1, 3):
            results[count] = run_workers(machines, pg.new_database(), count)
            result = results[count]
            print(
                f"{count} worker(s), {args.trials} trials: {result['per_trial']:.1f}s per trial "
                f"(median trial {result['median']:.1f}s; wall {result['wall']:.0f}s with start-up; "
                f"{result['hosts']} workers ran trials) ({load()})",
                flush=True,
            )
        print(f"3 workers vs 1: {results[3]['per_trial'] / results[1]['per_trial']:.2f}x the time per trial")
        seconds = bookkeeping(pg.new_database(), root, args.bookkeeping_trials)
        print(
            f"bookkeeping per trial (stand-in objective, {args.bookkeeping_trials} trials): PostgreSQL "
            f"{seconds['postgresql'] * 1000:.0f} ms, SQLite {seconds['sqlite'] * 1000:.0f} ms ({load()})",
            flush=True,
        )


if __name__ == "__main__":
    main()
