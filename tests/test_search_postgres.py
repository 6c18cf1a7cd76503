"""The merge search across machines on a real PostgreSQL server (the `postgres` fixture): worker processes that share
nothing but the database (no lock file, each its own host name), an exact trial count, a worker killed mid-trial
redone through Optuna's heartbeat, and a database restarted under running workers. The study's machinery is scored
by a stand-in objective here (tests/helpers/search_standin.py); test_search_workers.py runs real tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.machines import can_name_hosts, on_machine
from helpers.study_worker import HEARTBEAT, STUDY

from pipeline.search.coordination import DatabaseCoordination, LockLost
from pipeline.search.storage import Storage, StorageError, mask_url_passwords, resolve_storage
from pipeline.search.study import finished_trials, open_study

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "helpers" / "study_worker.py"


def start_worker(url: str, machine: str, total: int, *options: str, start_at: float = 0.0) -> subprocess.Popen:
    command = [sys.executable, str(WORKER), str(total), "--start-at", str(start_at), *options]
    return subprocess.Popen(
        on_machine(machine, command),
        cwd=REPO,
        env={**os.environ, "FTMERGE_SEARCH_STORAGE": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(workers: list[subprocess.Popen], timeout: float = 180) -> list[dict]:
    """Each worker's report, with what it printed before it (`printed`)."""
    reports = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=timeout)
        assert worker.returncode == 0, stderr
        *printed, last = stdout.strip().splitlines()
        reports.append({**json.loads(last), "printed": printed})
    return reports


def trials_of(url: str):
    return open_study(Storage(url), STUDY, HEARTBEAT).get_trials(deepcopy=False)


def states(trials) -> list[str]:
    return [trial.state.name for trial in trials]


def test_three_machines_work_one_study_and_it_ends_with_exactly_its_trials(postgres):
    """No lock file, three host names, trials asked for at the same moments: every trial number is worked once and
    the study holds exactly `total` trials, all finished (no "one extra per machine")."""
    url = postgres.new_database()
    start_at = time.time() + 8  # all three ask for their first trials together
    workers = [
        start_worker(url, f"machine-{index}", 13, "--trial-seconds", "0.2", start_at=start_at) for index in range(3)
    ]
    reports = finish(workers)
    trials = trials_of(url)
    assert states(trials) == ["COMPLETE"] * 13  # nothing running, waiting or failed, no 14th
    assert [trial.number for trial in trials] == list(range(13))
    assert [trial.user_attrs.get("label") for trial in trials[:2]] == ["published", "sum"]
    assert sum(report["done"] for report in reports) == 13 and all(report["done"] for report in reports)
    workers_seen = {trial.user_attrs["worker"] for trial in trials}
    assert len(workers_seen) == 3  # host:pid of each process
    if can_name_hosts():
        assert {report["host"] for report in reports} == {"machine-0", "machine-1", "machine-2"}
        assert {worker.split(":")[0] for worker in workers_seen} == {"machine-0", "machine-1", "machine-2"}
    assert len({json.dumps(trial.params, sort_keys=True) for trial in trials}) == 13  # none worked twice


def test_a_worker_killed_mid_trial_is_failed_by_its_heartbeat_and_redone_by_another(postgres, tmp_path):
    url = postgres.new_database()
    marker = tmp_path / "in-trial"
    killed = start_worker(url, "machine-0", 8, "--trial-seconds", "0.3", "--pause-at", "2", "--marker", str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.stderr.read() if killed.stderr else ""
        time.sleep(0.05)
    others = [start_worker(url, f"machine-{index}", 8, "--trial-seconds", "0.3") for index in (1, 2)]
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    reports = finish(others)
    trials = trials_of(url)
    failed = [trial for trial in trials if trial.state.name == "FAIL"]
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    assert len(complete) == 8 and len(failed) == 1 and len(trials) == 9  # the killed one, and nothing else extra
    retried = [trial for trial in complete if trial.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1, "Optuna's retry callback queued the killed trial once, and a worker ran it"
    assert retried[0].params == failed[0].params
    assert retried[0].user_attrs["point"] == json.loads(marker.read_text())  # what the killed worker was scoring
    assert retried[0].user_attrs["worker"].split(":")[1] != str(killed.pid)
    rows = finished_trials(open_study(Storage(url), STUDY, HEARTBEAT))
    assert len(rows) == 8 and sum(row["point"] == retried[0].user_attrs["point"] for row in rows) == 1
    assert sum(report["done"] for report in reports) == 7  # the killed worker finished one before it died


def test_workers_wait_out_a_database_restart_and_count_no_trial_twice(postgres):
    url = postgres.new_database()
    start_at = time.time() + 8
    workers = [
        start_worker(url, f"machine-{index}", 18, "--trial-seconds", "0.3", start_at=start_at) for index in range(3)
    ]
    deadline = time.monotonic() + 120
    while sum(state == "COMPLETE" for state in states(trials_of(url))) < 5:
        assert time.monotonic() < deadline and all(worker.poll() is None for worker in workers)
        time.sleep(0.1)
    postgres.restart(down_seconds=2)  # longer than a heartbeat interval, shorter than the grace period
    reports = finish(workers)
    waited = [line for report in reports for line in report["printed"] if "unreachable" in line or "heartbeat" in line]
    assert waited, "the restart reached no worker"
    trials = trials_of(url)
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    assert len(complete) == 18 and sum(report["done"] for report in reports) == 18
    assert not [trial for trial in trials if trial.state.name in ("RUNNING", "WAITING")]
    for trial in trials:  # a trial failed by the restart was queued again and finished once
        if trial.state.name == "FAIL":
            assert sum(t.system_attrs.get("failed_trial") == trial.number for t in complete) == 1
    assert len({json.dumps(trial.params, sort_keys=True) for trial in complete}) == 18


def test_a_lost_lock_is_reported_and_the_storage_never_shows_its_password(postgres):
    url = postgres.new_database()
    storage = Storage(url)
    assert postgres.password not in repr(storage) and postgres.password not in storage.display
    coordination = DatabaseCoordination(storage, STUDY, HEARTBEAT)
    with pytest.raises(LockLost), coordination.exclusive():
        postgres.restart()  # the lock's session ends under the block
    with coordination.exclusive():  # and the next one takes it again
        pass
    wrong = url.replace(postgres.password, "not-the-password")
    with pytest.raises(StorageError) as refused:
        open_study(Storage(wrong), STUDY, HEARTBEAT)
    assert "password authentication failed" in str(refused.value) and "not-the-password" not in str(refused.value)


def test_the_storage_url_is_read_from_the_environment_and_its_password_masked(monkeypatch):
    monkeypatch.setenv("FTMERGE_TEST_PASSWORD", "s3cret-Value")
    storage = resolve_storage("postgresql://ftmerge:${FTMERGE_TEST_PASSWORD}@db.example:5432/search")
    assert storage.url == "postgresql://ftmerge:s3cret-Value@db.example:5432/search"
    assert storage.display == "postgresql://ftmerge:***@db.example:5432/search" and storage.shared
    monkeypatch.delenv("FTMERGE_TEST_PASSWORD")
    with pytest.raises(StorageError, match=r"FTMERGE_TEST_PASSWORD .* is not set"):
        resolve_storage("postgresql://ftmerge:${FTMERGE_TEST_PASSWORD}@db.example/search")
    with pytest.raises(StorageError, match="mysql: the search runs its study on PostgreSQL"):
        resolve_storage("mysql://u:p@h/d")
    command = "pipeline.run r.yaml --set search.storage=postgresql://u:pa:ss@w0rd@db:5432/s --set x=https://h/y"
    assert (
        mask_url_passwords(command)
        == "pipeline.run r.yaml --set search.storage=postgresql://u:***@db:5432/s --set x=https://h/y"
    )


def test_a_worker_refuses_a_study_that_is_no_database_server(tmp_path):
    recipe = {"name": "n", "base_model": "b", "target_model": "t", "search": {"storage": "sqlite:///study.db"}}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "search-worker", "recipe.yaml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "a SQLite file is one machine's" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "study.db").exists()
