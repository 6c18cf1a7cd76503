"""The run's console: library output of every kind lands in the run's log, not on the screen; progress reported by a
child process reaches the parent's screen; a failure is one line naming the log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings

from pipeline import console, run, runner

CHILD_OUTPUT = "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"
CHILD_PROGRESS = """
from pipeline import console
with console.progress("steps", total=3, unit="steps") as bar:
    for step in range(3):
        bar.advance(info=f"loss {3 - step}")
print("a library banner from the child")
"""


def test_library_output_goes_to_the_log_and_say_to_the_screen(tmp_path, capsys):
    library = logging.getLogger("some.library")
    with console.run_console(tmp_path, command="test") as log:
        print("printed by a library")
        os.write(1, b"written to fd 1 by C code\n")
        os.write(2, b"written to fd 2 by C code\n")
        library.warning("a library's logging warning")
        warnings.warn("a deprecation nobody asked to see", DeprecationWarning, stacklevel=1)
        subprocess.run([sys.executable, "-c", CHILD_OUTPUT], check=True)
        console.say("prepare.reverse  done  1.0s")
    screen = capsys.readouterr()
    logged = log.read_text()
    for text in (
        "printed by a library",
        "written to fd 1",
        "written to fd 2",
        "a library's logging warning",
        "a deprecation nobody asked to see",
        "child stdout",
        "child stderr",
    ):
        assert text in logged and text not in screen.out + screen.err, text
    assert screen.out == "prepare.reverse  done  1.0s\n"
    assert "prepare.reverse  done" in logged, "the log has the screen's lines for context"
    assert log.parent == tmp_path / "logs"


def test_a_child_process_progress_reaches_the_parents_screen(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "PLAIN_INTERVAL_SECONDS", 0.0)
    with console.run_console(tmp_path) as log:
        subprocess.run([sys.executable, "-c", CHILD_PROGRESS], check=True)
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["  steps: 1/3 steps, loss 3", "  steps: 2/3 steps, loss 2", "  steps: 3/3 steps, loss 1"]
    logged = log.read_text()
    assert "a library banner from the child" in logged and console.MARKER not in logged


def test_plain_progress_lines_are_periodic(tmp_path, capsys):
    with console.run_console(tmp_path):
        for _ in console.tqdm(range(1000), desc="fused merge", unit="tensor"):
            pass
    assert capsys.readouterr().out == "", "a bar that ends within PLAIN_INTERVAL_SECONDS prints nothing"


def test_verbose_shows_the_library_output_too(tmp_path, capsys):
    with console.run_console(tmp_path, verbose=True) as log:
        print("printed by a library")
    assert "printed by a library" in capsys.readouterr().out
    assert "printed by a library" in log.read_text()


def test_a_failed_stage_is_one_line_naming_the_log_with_the_traceback_inside(tmp_path, capsys):
    with console.run_console(tmp_path) as log:
        try:
            raise runner.StageFailed("stage train, item reverse: ValueError: no rows")
        except runner.StageFailed as error:
            assert run._failed(error, log, 1) == 1
    screen = capsys.readouterr()
    assert screen.out == ""
    assert screen.err == f"error: stage train, item reverse: ValueError: no rows (traceback: {log})\n"
    assert "Traceback (most recent call last)" in log.read_text()


def test_streams_are_restored_after_the_run(tmp_path):
    before = sys.stdout, sys.stderr, os.fstat(1).st_ino, os.fstat(2).st_ino
    with console.run_console(tmp_path):
        pass
    assert (sys.stdout, sys.stderr, os.fstat(1).st_ino, os.fstat(2).st_ino) == before
    assert console.log_file() is None


def test_notices_of_the_run_and_of_its_child_processes_are_shown_under_the_steps_line(tmp_path, capsys):
    """What a user must know, raised in the runner's process or in a child (the training process), is logged at
    once and shown under the line of the step that raised it, in the same words."""
    child = "from pipeline import console; console.notice('train reverse: resumed from step 8')"
    with console.run_console(tmp_path) as log:
        console.notice("prepare reverse: 3 of 104 rows rejected")
        subprocess.run([sys.executable, "-c", child], check=True)
        time.sleep(0.2)  # the log pump reads the child's marker line
        console.say("train.reverse  done")
        runner.show_notices(console.say)
    assert capsys.readouterr().out.splitlines() == [
        "train.reverse  done",
        "  note: prepare reverse: 3 of 104 rows rejected",
        "  note: train reverse: resumed from step 8",
    ]
    logged = log.read_text()
    assert "note: prepare reverse: 3 of 104 rows rejected" in logged and console.MARKER not in logged
