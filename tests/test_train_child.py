"""Training runs in a spawned child process: the runner's process never imports Unsloth (which on a GPU patches the
model classes apply, merge and evaluate then use), the child's output streams through the parent, its error
reaches the user with the stage and the item, and killing the parent ends it. Real runs on tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import REPO
from helpers.recipes import TINY_TRAIN, write_pipeline_recipe

pytestmark = pytest.mark.slow

FULL_RUN = """
import json, sys
from pipeline.run import main
code = main([sys.argv[1]])
print(json.dumps({"code": code, "unsloth": sorted(m for m in sys.modules if m.split(".")[0].startswith("unsloth"))}))
"""


def children_running_training(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "pipeline.training.child" in command and ppid == parent:
            found.append(int(entry.name))
    return found


def test_after_a_full_run_unsloth_is_not_in_the_runners_process(tmp_path, tiny_models, finetune_sets):
    recipe = write_pipeline_recipe(
        tmp_path, tiny_models, finetune_sets, evaluate={"device": "cpu", "max_samples": 4, "batch_tokens": 256}
    )
    completed = subprocess.run(
        [sys.executable, "-c", FULL_RUN, str(recipe)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert outcome["unsloth"] == []
    log = run_log(tmp_path / "run")
    assert "Unsloth" in log, "the child's output is streamed through the parent, into the run's log"
    assert "train: unsloth backend; starting at step 0" in log
    assert "Unsloth" not in completed.stdout, "the libraries' output stays off the screen"
    assert (tmp_path / "run" / "evaluate" / "report.json").is_file()


def test_the_childs_error_reaches_the_user_with_stage_and_item(tmp_path, tiny_models, finetune_sets):
    recipe = write_pipeline_recipe(
        tmp_path,
        tiny_models,
        finetune_sets,
        train={"backend": "transformers", "max_seq_length": 64, "load_in_4bit": False, "optim": "no_such_optimizer"},
    )
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.run", str(recipe), "--stage", "prepare", "--stage", "train"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 1
    error = completed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: stage train, item reverse: TrainingFailed: ValueError:"), error
    assert "no_such_optimizer" in error
    assert "Traceback" in run_log(tmp_path / "run"), "the child's traceback was streamed into the run's log"


def run_log(output_dir: Path) -> str:
    return "".join(path.read_text() for path in sorted((output_dir / "logs").glob("run-*.log")))


def test_killing_the_parent_ends_the_training_child(tmp_path, tiny_models, finetune_sets):
    recipe = write_pipeline_recipe(
        tmp_path,
        tiny_models,
        finetune_sets,
        train={**TINY_TRAIN, "backend": "transformers", "max_steps": 100000, "save_steps": 100000},
    )
    parent = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", str(recipe)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (children := children_running_training(parent.pid)) and time.monotonic() < deadline:
            assert parent.poll() is None, "the run ended before training started"
            time.sleep(0.5)
        assert children, "no training child appeared"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{children[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{children[0]}").exists(), "the child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in children_running_training(parent.pid):
            os.kill(pid, signal.SIGKILL)
