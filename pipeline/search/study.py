"""The search loop on an Optuna study: baselines first, then the sampler's suggestions, until the study holds the
requested number of finished trials.

The study lives in Optuna's storage (SQLite in the run by default), so a killed search resumes where it stopped and
several processes — on one machine, or on several sharing a PostgreSQL database — work one study together. Two rules
keep that exact: a trial is asked for under the study's lock (`coordination`) while fewer than `total` trials are
finished or running (no trial is done twice, none too many), and the sampler is reseeded from the number of finished
and running trials, so a resumed search suggests what the uninterrupted one would have, and processes asking while
others' trials run get other suggestions than those. On a database, where a running trial may belong to a worker that
died, workers wait for such trials to finish or to be failed by their heartbeat and redone.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.locking import alive_here
from pipeline.search.coordination import (
    RETRIES_PER_TRIAL,
    Heartbeat,
    first_line,
    is_connection_error,
)
from pipeline.search.storage import Storage, StorageError, sqlite_storage

LABEL = "label"
RESULT = "result"
WAIT = "wait"  # _next_trial: the study is full of finished and running trials, but not all of them are finished
CONSTRAINTS = "constraints"  # the trial system attribute Optuna's samplers read and optuna-dashboard shows
CREATE_ATTEMPTS = 5
RETRIED_TRIAL = "failed_trial"  # set by Optuna's RetryHeartbeatStaleTrialCallback on the trial it queues again


def open_study(storage: Storage | str, name: str, heartbeat: Heartbeat | None = None):
    """Create the study, or load it when a previous or concurrent process made it. On a database server the
    storage runs Optuna's heartbeat (`heartbeat`, or its defaults) and queues a trial whose heartbeat went stale
    again. Raises StorageError, without the URL's password, when the database cannot be reached."""
    import optuna

    storage = storage if isinstance(storage, Storage) else Storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _clear_errors(storage):
        return optuna.create_study(
            study_name=name, storage=optuna_storage(storage, heartbeat), direction="maximize", load_if_exists=True
        )


def optuna_storage(storage: Storage, heartbeat: Heartbeat | None = None):
    """Optuna's RDBStorage for the study's storage. Several workers starting on an empty database create Optuna's
    tables at once and all but one fail (PostgreSQL's catalog refuses the same type twice): those try again."""
    import sqlalchemy.exc

    for attempt in range(CREATE_ATTEMPTS):
        try:
            with _clear_errors(storage):
                return _rdb_storage(storage, heartbeat)
        except sqlalchemy.exc.DBAPIError:
            if not storage.shared or attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _clear_errors(storage: Storage):
    """A database that cannot be reached as a StorageError whose message holds no password."""
    try:
        yield
    except Exception as error:
        if not (storage.shared and is_connection_error(error)):
            raise
        raise StorageError(
            f"cannot open the search study on {storage.display}: {storage.scrub(first_line(error))}"
        ) from None


def _rdb_storage(storage: Storage, heartbeat: Heartbeat | None):
    import optuna

    if not storage.shared:
        return optuna.storages.RDBStorage(storage.url, engine_kwargs={"connect_args": {"timeout": 120}})
    heartbeat = heartbeat or Heartbeat()
    with warnings.catch_warnings():  # the heartbeat is experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            storage.url,
            engine_kwargs={"pool_pre_ping": True},  # a connection that died with a restarted server is replaced
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=RETRIES_PER_TRIAL
            ),
        )


def other_studies(storage: Storage, name: str, prefix: str) -> list[str]:
    """The storage's studies named `prefix…`, other than `name` (a worker with other inputs names another study)."""
    import optuna

    names = optuna.study.get_all_study_names(storage=optuna_storage(storage))
    return sorted(other for other in names if other.startswith(prefix) and other != name)


def sqlite_url(path) -> str:
    return sqlite_storage(path).url


def make_sampler(kind: str, seed: int):
    """TPE (the default; it reads each trial's constraint, so trials that break the gate steer it away, and with
    `constant_liar`, Optuna's setting for parallel workers, away from the points of trials still running), CMA-ES,
    or random."""
    import optuna

    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


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


def _next_trial(study, *, total: int, baselines: dict[str, dict], sampler: str, seed: int, coordination):
    """Ask for the next trial (the first baseline not yet queued, a trial queued again, else the sampler's), WAIT
    while running trials may still fail, or None when the study is full. Each trial is queued with the marks of its
    process (its owner) before it is asked for: a process killed between `ask` and marking it would leave a running
    trial nobody can tell from a live one, and that fills a place of the study forever."""
    from optuna.trial import TrialState

    coordination.recover(study)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    active = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)]
    if len(active) >= total:
        return WAIT if coordination.waits_for_running and len(finished) < total else None
    queued = {
        t.user_attrs.get(LABEL)
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    }
    marks = coordination.marks()
    label = next((label for label in baselines if label not in queued), None)
    if label is not None:
        study.enqueue_trial(baselines[label], user_attrs={LABEL: label, **marks})
    elif not any(t.state == TrialState.WAITING for t in trials):
        study.enqueue_trial({}, user_attrs=marks)
    study.sampler = make_sampler(sampler, seed + len(active))
    coordination.before_ask(study)
    with warnings.catch_warnings():
        # On a database this loop runs what Study.optimize runs around a trial (stale trials failed before `ask`,
        # Optuna's heartbeat thread while it runs), under a lock that keeps the count exact, which optimize cannot.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    for key, value in marks.items():  # a trial queued again carries the marks of the process that died
        trial.set_user_attr(key, value)
    return trial


def _take_trial(study, suggest: Callable, coordination, **settings):
    """(trial, point, heartbeat) asked for under the study's lock, WAIT, or None. The trial's heartbeat (a context to
    exit when it is reported) beats from the moment it runs, so a slow suggestion never looks like a dead worker. A
    trial asked under a lock that turned out lost is given back before the error is raised for the caller to retry."""
    asked = []
    with contextlib.ExitStack() as heartbeat:
        try:
            with coordination.exclusive():
                trial = _next_trial(study, coordination=coordination, **settings)
                if trial is None or trial is WAIT:
                    return trial
                asked.append(trial)
                heartbeat.enter_context(coordination.running(study, trial))
                point = suggest(trial)
        except Exception:
            heartbeat.close()
            for trial in asked:
                coordination.give_back(study, trial)
            raise
        return trial, point, heartbeat.pop_all()


def _report(study, trial, point: dict, result: dict) -> bool:
    """Record a trial's outcome; False when the trial was failed meanwhile (its heartbeat went stale during a long
    database outage), and its retry counts instead. Safe to repeat after a lost connection."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        trial.set_user_attr("point", point)
        trial.set_user_attr(RESULT, result)
        for kind in ("learned", "kept"):  # one number per set, for optuna-dashboard's trial table and plots
            for name, value in result[kind].items():
                trial.set_user_attr(f"{kind}.{name}", value)
        # The gate as the list Optuna's samplers read (TPE steers away from trials > 0) and optuna-dashboard 0.21
        # shows; Trial.set_constraint's per-name attributes are not shown by the dashboard.
        trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS, [result["violation"]])
        study.tell(trial, result["objective"])
    except (UpdateFinishedTrialError, ValueError):  # Optuna's errors for a trial already finished
        state = study.get_trials(deepcopy=False)[trial.number].state
        if state == TrialState.RUNNING:
            raise
        return state == TrialState.COMPLETE
    return True


def run_trials(
    study,
    *,
    total: int,
    baselines: dict[str, dict],
    suggest: Callable,
    evaluate: Callable[[dict], dict],
    coordination,
    sampler: str = "tpe",
    seed: int = 0,
    on_trial: Callable | None = None,
) -> int:
    """Work the study until it holds `total` finished trials (or finished and running ones, on one machine).
    `suggest(trial)` turns an Optuna trial into a point; `evaluate(point)` returns a JSON-able result with
    `objective`, `violation`, `learned` and `kept`. `coordination` (a FileCoordination or DatabaseCoordination)
    decides how processes take turns. Returns the number of trials this process finished."""
    settings = {"total": total, "baselines": baselines, "sampler": sampler, "seed": seed}
    done, waiting = 0, False
    while True:
        taken = coordination.call(lambda: _take_trial(study, suggest, coordination, **settings))
        if taken is None:
            return done
        if taken is WAIT:
            if not waiting:
                coordination.say(
                    "search: the study's last trials are running elsewhere; waiting for them (the trial of a worker "
                    "that died is run again once its heartbeat is older than the grace period)"
                )
            waiting = True
            time.sleep(coordination.poll_seconds)
            continue
        waiting = False
        trial, point, heartbeat = taken
        with heartbeat:
            result = evaluate(point)
            reported = coordination.call(lambda: _report(study, trial, point, result))  # noqa: B023 (called here)
        if not reported:
            continue
        done += 1
        if on_trial is not None:
            on_trial(trial.number, trial.user_attrs.get(LABEL), result)


def is_full(study, total: int) -> bool:
    """Whether the study already holds `total` finished trials."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= total


def finished_trials(study) -> list[dict[str, Any]]:
    """Every finished trial as a leaderboard row: number, label (`seed`, `sum`, or the trial number), point and
    result, in trial order; `retry_of` names the trial a dead worker left, when this one ran it again."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        retried = trial.system_attrs.get(RETRIED_TRIAL)
        rows.append(
            {
                "number": trial.number,
                "label": trial.user_attrs.get(LABEL) or str(trial.number),
                "point": trial.user_attrs["point"],
                **trial.user_attrs[RESULT],
                **({} if retried is None else {"retry_of": retried}),
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
