"""Exclusive locks on files: one run per output directory, one writer per archived adapter.

Two runs on one output directory would share its `.partial` directories and delete each other's work. The lock is
an `flock` on a file, so the kernel releases it when its holder dies, however it dies: a lock left by a dead process
is simply taken. The file records who holds it (pid, host, start time), for the message the second run prints.
Where the filesystem has no `flock` (some FUSE mounts), the record itself is the lock, taken over when its pid is
no longer alive on this host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names its pid and host."""


def holder_of(path: Path) -> dict:
    """What the lock file says about its last holder ({} when empty or unreadable)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its pid yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"


def alive_here(holder: dict) -> bool:
    """True unless the holder is known dead: a pid on another host cannot be checked from here."""
    if not holder or holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


@contextlib.contextmanager
def wait_exclusive(path: Path) -> Iterator[None]:
    """Hold the lock on `path` for the duration of the block, waiting for it as long as another process holds it:
    for a short critical section that processes of one job take turns at (asking an Optuna study for a trial)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def try_exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock on `path` for the duration of the block, or raise LockHeld at once (no waiting): for work
    that must not run twice (a run's output directory, an archived adapter). `what` is the thing locked, for the
    message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(
                f"{what} is in use by {describe(holder_of(path))} (lock {path}); wait for that run "
                "to finish, or stop it"
            ) from None
        except OSError as error:
            if error.errno not in NO_FLOCK or alive_here(holder_of(path)):
                raise LockHeld(
                    f"{what} is in use by {describe(holder_of(path))} (lock {path}, a filesystem without "
                    "flock: delete the file if that process is gone)"
                ) from None
        handle.truncate(0)
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
        )
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            handle.flush()


def lock_file(output: Path) -> Path:
    """The lock of an output several runs may write (an archived adapter): `.<name>.lock` beside it, a dotfile the
    archive never lists."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def run_locks(output_dir: Path, shared_outputs: list[Path]) -> Iterator[None]:
    """One run per output directory (`<output_dir>/.lock`), and no other run writing the shared outputs this one
    may write, held for the whole run; LockHeld at once otherwise."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(try_exclusive(Path(output_dir) / ".lock", f"output_dir {output_dir}"))
        for output in shared_outputs:
            stack.enter_context(try_exclusive(lock_file(output), str(output)))
        yield
