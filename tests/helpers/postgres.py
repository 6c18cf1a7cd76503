"""A throwaway PostgreSQL cluster: `initdb` in a new temporary directory, a free port on 127.0.0.1, password
authentication over TCP (trust on its own Unix socket), stopped and removed after.

PostgreSQL refuses to run as root, so as root the cluster belongs to `nobody` (`runuser -u nobody -- initdb …`).
Debian puts the binaries in `$(pg_config --bindir)`, not on PATH. The cluster trades durability for speed (no fsync):
it lives for one test session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BINARIES = ("initdb", "pg_ctl")
SUPERUSER = "postgres"
TEST_SETTINGS = ("-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off")


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: `pg_config --bindir` (Debian), else PATH; None when PostgreSQL is absent."""
    candidates = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, check=True, text=True)
        candidates.append(Path(found.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    return next((path for path in candidates if all((path / name).is_file() for name in BINARIES)), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresCluster:
    """One cluster: `url(database)` for clients, `new_database()` for a test of its own, `restart()` under them."""

    def __init__(self, bindir: Path, root: Path, *, durable: bool = False):
        self.bindir, self.root = bindir, root
        self.data, self.log = root / "data", root / "server.log"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.settings = [
            f"-c port={self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={root}",
            *(() if durable else TEST_SETTINGS),
        ]
        self._names = itertools.count()

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        """A PostgreSQL binary, as `nobody` when this process is root (the server refuses root)."""
        prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*prefix, str(self.bindir / command[0]), *command[1:]], capture_output=True, text=True, check=True
        )

    def init(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody")
            shutil.chown(password_file, "nobody")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        password_file.unlink()

    def start(self) -> None:
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-o", " ".join(self.settings))

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w")

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop (disconnecting every client), stay down `down_seconds`, and start again."""
        self.stop("fast")
        time.sleep(down_seconds)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database for one test; returns its URL (with the password)."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_cluster(*, durable: bool = False) -> Iterator[PostgresCluster]:
    """A started cluster, stopped and removed on exit. Raises FileNotFoundError when PostgreSQL is not installed."""
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL's initdb and pg_ctl were not found (pg_config --bindir, PATH)")
    root = Path(tempfile.mkdtemp(prefix="ftmerge-postgres-"))  # /tmp: `nobody` can reach it, unlike pytest's tmp
    cluster = PostgresCluster(bindir, root, durable=durable)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
