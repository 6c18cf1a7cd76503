"""How the processes that work one study take turns, and how the trial of a process that died is found and redone.

One machine (a SQLite study, `FileCoordination`): an flock on a file beside the study, and each trial names its owner
(pid and host) from the moment it is queued, so the next run fails the trials of pids that are gone
(`study.fail_abandoned`) and does them again.

Several machines (a PostgreSQL study, `DatabaseCoordination`) share nothing but the database. A PostgreSQL advisory
lock, held on a connection of its own, stands for the file lock: the server releases it when that connection ends,
however its holder died. Optuna's heartbeat stands for the owners: a running trial's process records a heartbeat
every `heartbeat_interval` seconds; whoever asks for a trial first fails the trials silent for `grace_period` seconds
(`optuna.storages.fail_stale_trials`), and Optuna's `RetryHeartbeatStaleTrialCallback` queues each again with its
parameters, for any worker to take. A database restarted under the workers is waited for: each step is retried while
the connection is lost (up to `reconnect_seconds`), and a heartbeat that fails is tried again at the next beat.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.locking import wait_exclusive
from pipeline.search.storage import Storage

RECONNECT_SECONDS = 600.0  # how long a worker waits for its database to come back before it gives up
RETRIES_PER_TRIAL = 2  # a trial whose process died this often is not queued again (it may be what kills them)
KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"


@dataclass(frozen=True)
class Heartbeat:
    """Optuna's heartbeat settings (seconds) for a study on a database server."""

    interval: int = 30
    grace_period: int = 120


class LockLost(RuntimeError):
    """The advisory lock's connection ended while held (the server restarted): another worker may have counted the
    study's trials meanwhile, so what was asked under it is given back."""


class FileCoordination:
    """One machine: an flock on `lock_path`, trials owned by a pid on this host."""

    waits_for_running = False  # a running trial here is a live sibling's, or failed by the next run's fail_abandoned
    poll_seconds = 0.0
    say = staticmethod(print)

    def __init__(self, lock_path: Path):
        self.lock_path = Path(lock_path)

    def exclusive(self):
        return wait_exclusive(self.lock_path)

    def marks(self) -> dict[str, Any]:
        """User attributes a trial is queued with, naming the process that will run it."""
        return {"owner": {"pid": os.getpid(), "host": socket.gethostname()}}

    def recover(self, study) -> None:
        """Nothing per trial: the stage fails abandoned trials once, when it starts."""

    def before_ask(self, study) -> None:
        pass

    def running(self, study, trial):
        return contextlib.nullcontext()

    def call(self, step: Callable[[], Any]) -> Any:
        return step()

    def give_back(self, study, trial) -> None:
        """Never needed: an flock cannot be lost while held."""


class DatabaseCoordination:
    """Several machines: a PostgreSQL advisory lock per study and Optuna's heartbeats; retries while the database is
    unreachable. `say` receives the lines a user should see (an outage, a trial redone)."""

    waits_for_running = True  # a running trial may be a dead worker's, failed once its heartbeat is stale

    def __init__(
        self,
        storage: Storage,
        study_name: str,
        heartbeat: Heartbeat,
        *,
        reconnect_seconds: float = RECONNECT_SECONDS,
        say: Callable[[str], None] = print,
    ):
        self.storage = storage
        self.key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        self.poll_seconds = float(heartbeat.interval)
        self.reconnect_seconds = reconnect_seconds
        self.say = say
        self._engine = None

    def _connect(self):
        if self._engine is None:
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(
                self.storage.url,
                pool_pre_ping=True,
                pool_size=1,
                # The server probes the lock's connection once idle for 30 s: a machine that vanishes while holding
                # the lock (no FIN ever comes) gives it up in about a minute, not after the kernel's two hours.
                connect_args={"options": KEEPALIVES},
            )
        return self._engine.connect()

    @contextlib.contextmanager
    def exclusive(self):
        """The study's advisory lock for the block. A session-level lock lives as long as its connection: when the
        unlock at the end fails, the connection died while the block ran, and LockLost says so."""
        import sqlalchemy

        connection = self._connect()
        try:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            connection.commit()
            yield
            try:
                held = connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                if not held.scalar():
                    raise LockLost("the study's lock was no longer held when released")
                connection.commit()
            except Exception as error:
                if is_connection_error(error):
                    raise LockLost("the study's database connection ended while its lock was held") from error
                raise
        except BaseException:
            connection.invalidate()  # never back to the pool while it may still hold the lock
            raise
        finally:
            connection.close()

    def marks(self) -> dict[str, Any]:
        return {"worker": f"{socket.gethostname()}:{os.getpid()}"}

    def recover(self, study) -> None:
        """Fail the trials whose heartbeat stopped; Optuna's retry callback queues each again."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)

    def before_ask(self, study) -> None:
        """A heartbeat for the queued trial `ask` is about to start (the first one waiting), so that it has one from
        its first moment: Optuna's stale check skips a running trial that never beat, and a worker killed between
        `ask` and its first beat would leave a trial running forever, a place of the study never filled."""
        from optuna.trial import TrialState

        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            study._storage.record_heartbeat(waiting[0]._trial_id)

    def running(self, study, trial):
        """Optuna's own heartbeat thread (what `Study.optimize` runs around each trial), beating through a storage
        that survives a lost connection."""
        from optuna.storages._heartbeat import HeartbeatThread

        return HeartbeatThread(trial._trial_id, _PatientHeartbeat(study._storage, self.storage, self.say))

    def call(self, step: Callable[[], Any]) -> Any:
        """`step()`, retried while the database is unreachable (a restart, a network cut), up to
        `reconnect_seconds`."""
        deadline = time.monotonic() + self.reconnect_seconds
        delay = 1.0
        while True:
            try:
                return step()
            except Exception as error:
                if not is_connection_error(error) or time.monotonic() + delay > deadline:
                    raise
                self.say(
                    f"search: the study's database is unreachable ({self.storage.scrub(first_line(error))}); "
                    f"retrying in {delay:.0f}s"
                )
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def give_back(self, study, trial) -> None:
        """Fail a trial asked under a lock that was lost and queue it again (as a stale one would be), so it never
        counts twice; best effort: if the database is gone again, its heartbeat goes stale and the same happens."""
        import optuna
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):
            study.tell(trial, state=TrialState.FAIL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = study._storage.get_heartbeat_stale_trial_callback()
                if retry is not None:
                    retry(study, study._storage.get_trial(trial._trial_id))


class _PatientHeartbeat:
    """Optuna's heartbeat interface over a storage, where a failed beat is reported and skipped instead of ending
    Optuna's heartbeat thread: a restart shorter than the grace period must not make a live trial stale."""

    def __init__(self, optuna_storage, storage: Storage, say: Callable[[str], None]):
        self.optuna_storage, self.storage, self.say = optuna_storage, storage, say

    def get_heartbeat_interval(self) -> int | None:
        return self.optuna_storage.get_heartbeat_interval()

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.optuna_storage.record_heartbeat(trial_id)
        except Exception as error:
            if not is_connection_error(error):
                raise
            self.say(f"search: a heartbeat was not recorded ({self.storage.scrub(first_line(error))}); next beat")


def is_connection_error(error: BaseException) -> bool:
    """A lost or refused database connection, anywhere in the exception's chain (Optuna wraps SQLAlchemy's errors
    in StorageInternalError)."""
    import sqlalchemy.exc

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, LockLost)):
            return True
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        error = error.__cause__ or error.__context__
    return False


def first_line(error: BaseException) -> str:
    """The root cause's first line: what the driver said, without SQLAlchemy's statement and link."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
