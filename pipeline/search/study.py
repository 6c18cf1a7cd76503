"""The search loop on an Optuna study: baselines first, then the sampler's suggestions, until the study holds the
requested number of finished trials.

The study lives in Optuna's storage (SQLite in the run by default), so a killed search resumes where it stopped and
several processes — on one machine or, with a shared database URL, on several — work one study together. Two rules
keep that exact: a trial is asked for under a lock while fewer than `total` trials are finished or running (no
trial is done twice, none too many), and the sampler is reseeded from the number of finished trials, so a resumed
search suggests what the uninterrupted one would have.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.locking import alive_here, wait_exclusive

LABEL = "label"
RESULT = "result"


def open_study(storage: str, name: str):
    """Create the study, or load it when a previous or concurrent run made it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine = {"connect_args": {"timeout": 120}} if storage.startswith("sqlite") else {}
    return optuna.create_study(
        study_name=name,
        storage=optuna.storages.RDBStorage(storage, engine_kwargs=engine),
        direction="maximize",
        load_if_exists=True,
    )


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).absolute()}"


def make_sampler(kind: str, seed: int):
    """TPE (the default; it reads each trial's constraint, so trials that break the gate steer it away), CMA-ES,
    or random."""
    import optuna

    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def fail_abandoned(study) -> list[int]:
    """Mark trials left running by a process that no longer exists on this host (a killed search) as failed, so
    their work is redone. Returns their numbers."""
    from optuna.trial import TrialState

    abandoned = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner")
        if owner and not alive_here(owner):
            study.tell(trial.number, state=TrialState.FAIL)
            abandoned.append(trial.number)
    return abandoned


def _next_trial(study, *, total: int, baselines: dict[str, dict], sampler: str, seed: int):
    """Ask for the next trial (the first baseline not yet queued, else the sampler's), or None when the study is
    full. Each trial is enqueued with its owner before it is asked for: a process killed between `ask` and setting
    the owner would leave a running trial that `fail_abandoned` cannot tell from a live one, and that fills a place
    of the study forever."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    active = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)]
    if len(active) >= total:
        return None
    queued = {
        t.user_attrs.get(LABEL)
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    }
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    label = next((label for label in baselines if label not in queued), None)
    if label is not None:
        study.enqueue_trial(baselines[label], user_attrs={LABEL: label, "owner": owner})
    elif not any(t.state == TrialState.WAITING for t in trials):
        study.enqueue_trial({}, user_attrs={"owner": owner})
    study.sampler = make_sampler(sampler, seed + len(finished))
    trial = study.ask()
    trial.set_user_attr("owner", owner)
    return trial


def run_trials(
    study,
    *,
    total: int,
    baselines: dict[str, dict],
    suggest: Callable,
    evaluate: Callable[[dict], dict],
    lock_path: Path,
    sampler: str = "tpe",
    seed: int = 0,
    on_trial: Callable | None = None,
) -> int:
    """Work the study until it holds `total` finished or running trials. `suggest(trial)` turns an Optuna trial
    into a point; `evaluate(point)` returns a JSON-able result with `objective` and `violation`. Returns the number
    of trials this process finished."""
    done = 0
    while True:
        with wait_exclusive(lock_path):
            trial = _next_trial(study, total=total, baselines=baselines, sampler=sampler, seed=seed)
            if trial is None:
                return done
            point = suggest(trial)
        result = evaluate(point)
        trial.set_user_attr("point", point)
        trial.set_user_attr(RESULT, result)
        trial.set_constraint("retention", result["violation"])  # > 0: breaks the gate; TPE steers away from it
        study.tell(trial, result["objective"])
        done += 1
        if on_trial is not None:
            on_trial(trial.number, trial.user_attrs.get(LABEL), result)


def finished_trials(study) -> list[dict[str, Any]]:
    """Every finished trial as a leaderboard row: number, label (`seed`, `sum`, or the trial number), point and
    result, in trial order."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rows.append(
            {
                "number": trial.number,
                "label": trial.user_attrs.get(LABEL) or str(trial.number),
                "point": trial.user_attrs["point"],
                **trial.user_attrs[RESULT],
            }
        )
    return rows


def choose(rows: list[dict]) -> dict | None:
    """The best trial that passes the gate (highest objective; ties go to the earlier trial), or None."""
    passing = [row for row in rows if row["passes"]]
    return max(passing, key=lambda row: (row["objective"], -row["number"])) if passing else None


def closest(rows: list[dict]) -> dict | None:
    """The trial nearest to passing, for the error when none does."""
    return min(rows, key=lambda row: (row["violation"], -row["objective"])) if rows else None
