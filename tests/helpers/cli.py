"""Running `python -m pipeline.run` as a user does: to completion, in the background, or killed at a chosen point."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"  # holds helpers/: a subprocess script that imports them puts this on its sys.path


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """The run's output goes to a file: a pipe nobody reads while waiting for the kill point fills up and blocks it."""
    with log.open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", *map(str, args)],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )


def kill_when(process: subprocess.Popen, condition, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"finished before the kill point:\n{log.read_text()}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def rerun_from_copy(finished_run: dict, copy: Path, stages: tuple[str, ...]) -> list[str]:
    """Copy a finished run's outputs to `copy` as if `stages` had never run (their outputs and state files gone), and
    return the arguments of the command that runs them again into the copy, from the first of them."""
    shutil.copytree(finished_run["output"], copy)
    for stage in stages:
        shutil.rmtree(copy / stage)
        for state in (copy / "state").glob(f"{stage}*.json"):
            state.unlink()
    return [finished_run["recipe"], "--from", stages[0], "--set", f"output_dir={copy}"]
