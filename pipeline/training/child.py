"""Training in a spawned child process: `python -m pipeline.training.child SPEC.json`.

On a GPU, `import unsloth` patches transformers' model classes for the whole process: apply, merge and evaluate run
after training in that process would use Unsloth's kernels, and a later `--stage evaluate` transformers', so a report
could not be reproduced. The 4-bit model and the optimizer would also stay in GPU memory until the process ends.
So each fine-tune trains in a fresh interpreter that exits when it is done; the runner's process never imports
Unsloth. The child's output is streamed through the parent (a notebook shows it in the cell; the runner's log gets
it), a kill of the parent ends the child, and the child's error is raised in the parent with its type and message.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pipeline
from pipeline.training.job import TrainingJob

PARENT_POLL_SECONDS = 1.0


class TrainingFailed(RuntimeError):
    """The child raised; the message is its exception's type and message (its traceback was streamed)."""


def train_lora_in_child(job: TrainingJob) -> dict:
    """`trainer.train_lora(job)` in a child process; returns its metrics."""
    with tempfile.TemporaryDirectory(prefix="ftmerge-train-") as exchange:
        spec, result = Path(exchange) / "spec.json", Path(exchange) / "result.json"
        spec.write_text(json.dumps({"job": job.as_json(), "result": str(result), "parent": os.getpid()}))
        returncode = run_child([sys.executable, "-m", "pipeline.training.child", str(spec)])
        outcome = json.loads(result.read_text()) if result.is_file() else {}
    if "metrics" in outcome:
        return outcome["metrics"]
    error = outcome.get("error")
    if error:
        raise TrainingFailed(f"{error['type']}: {error['message']}")
    raise TrainingFailed(f"the training process ended with exit code {returncode} before reporting a result")


def run_child(command: list[str]) -> int:
    """Run `command` with the package importable, copying its output to this process's stdout as it comes (bytes
    as they arrive, so progress bars redraw in place); the child is ended if this process is interrupted."""
    root = str(Path(pipeline.__file__).resolve().parents[1])
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := os.read(child.stdout.fileno(), 65536):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        return child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        child.stdout.close()


def end_with_parent(parent: int) -> None:
    """Exit as soon as the parent is gone (its pid no longer our parent's), however it died."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="end-with-parent").start()


def main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    end_with_parent(spec["parent"])
    result = Path(spec["result"])
    try:
        from pipeline.training.trainer import train_lora

        metrics = train_lora(TrainingJob.from_json(spec["job"]))
    except BaseException as error:  # KeyboardInterrupt too: the parent must learn why
        traceback.print_exc()
        with contextlib.suppress(OSError):
            result.write_text(json.dumps({"error": {"type": type(error).__name__, "message": str(error)}}))
        return 1
    result.write_text(json.dumps({"metrics": metrics}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
