"""One run per output directory, one writer per archived adapter: a second run exits 1 at once naming the pid and
host holding the lock, and a lock left by a dead process is taken over (the kernel drops a dead holder's flock).
Without a lock, two runs on one output_dir shared its `.partial` directories: one crashed in evaluate
(`FileNotFoundError … evaluate.partial/report.png`) while both trained the same fine-tune in one directory."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers.models import make_adapter
from helpers.recipes import recipe_data, write_recipe

from pipeline import locking
from pipeline.archive.importing import import_adapter
from pipeline.archive.store import ArchiveError
from pipeline.run import main as run_pipeline

HOLDER = """
import sys, time
from pipeline.locking import try_exclusive
with try_exclusive(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def hold():
    """Start processes holding locks; each is killed at the end if the test has not killed it."""
    holders = []

    def start(path) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        holders.append(holder)
        return holder

    yield start
    for holder in holders:
        holder.kill()
        holder.wait()


@pytest.fixture
def recipe(tmp_path, tiny_models):
    import_adapter(
        tmp_path / "archive", make_adapter(tiny_models["base"], tmp_path / "alpha"), "alpha", str(tiny_models["base"])
    )
    data = recipe_data(
        tiny_models,
        tmp_path / "run",
        name="locked",
        archive_dir=tmp_path / "archive",
        apply={"device": "cpu", "save": False},
        merge={"adapters": ["alpha"], "device": "cpu", "engine": "fused"},
        evaluate={"enabled": False},
    )
    return write_recipe(tmp_path / "recipe.yaml", data)


def test_a_second_run_exits_at_once_naming_the_holder_and_a_dead_holders_lock_is_taken(recipe, tmp_path, hold, capsys):
    holder = hold(tmp_path / "run" / ".lock")
    assert run_pipeline([str(recipe)]) == 1
    error = capsys.readouterr().err
    assert f"pid {holder.pid} on host {socket.gethostname()}" in error and "output_dir" in error
    assert not (tmp_path / "run" / "merge").exists() and not (tmp_path / "run" / "state").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run_pipeline([str(recipe)]) == 0
    assert (tmp_path / "run" / "merge" / "config.json").is_file()


def test_dry_run_and_status_take_no_lock(recipe, tmp_path, hold):
    hold(tmp_path / "run" / ".lock")
    assert run_pipeline([str(recipe), "--dry-run"]) == 0
    assert run_pipeline([str(recipe), "--status"]) == 0


def test_a_run_holds_the_archived_adapters_it_writes(tmp_path, hold):
    """Two recipes sharing an archive: the one about to archive `alpha` holds it for its whole run."""
    archived = tmp_path / "archive" / "alpha"
    holder = hold(locking.lock_file(archived))
    with (
        pytest.raises(locking.LockHeld, match=f"pid {holder.pid}"),
        locking.run_locks(tmp_path / "other-run", [archived]),
    ):
        pass
    assert not (tmp_path / "other-run" / ".lock").read_text(), "the output_dir lock taken first was released"


def test_an_archive_command_does_not_write_an_adapter_a_run_is_writing(tmp_path, tiny_models, hold):
    holder = hold(locking.lock_file(tmp_path / "archive" / "alpha"))
    adapter = make_adapter(tiny_models["base"], tmp_path / "alpha")
    with pytest.raises(ArchiveError, match=f"pid {holder.pid}"):
        import_adapter(tmp_path / "archive", adapter, "alpha", str(tiny_models["base"]))
    assert not (tmp_path / "archive" / "alpha").exists()
    assert not list((tmp_path / "archive").glob("*.partial"))


def no_flock(handle, operation):
    raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_the_record_is_the_lock(tmp_path, monkeypatch):
    """Some FUSE mounts have no flock: a record of a live pid on this host holds, one of a dead pid is taken."""
    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}", "started": "earlier"}}')
    with locking.try_exclusive(lock, "output_dir x"):
        assert locking.holder_of(lock)["pid"] == os.getpid()
        with pytest.raises(locking.LockHeld, match=f"pid {os.getpid()}"), locking.try_exclusive(lock, "output_dir x"):
            pass
    assert locking.holder_of(lock) == {}
