"""Trainer checkpoints in the working directory: which one to resume from, and cleaning up after success.

The HF Trainer writes `trainer_state.json` last in a checkpoint (after weights, optimizer, scheduler and RNG state),
so a checkpoint without a readable one was cut short by a kill and is never resumed from.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints(workdir: Path) -> list[Path]:
    """Every checkpoint-N directory, oldest step first."""
    found = [p for p in Path(workdir).iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def last_complete_checkpoint(workdir: Path) -> Path | None:
    complete = [c for c in checkpoints(workdir) if is_complete(c)]
    return complete[-1] if complete else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT_NAME.match(checkpoint.name).group(1))


def remove_incomplete_checkpoints(workdir: Path) -> list[Path]:
    """Delete checkpoints a kill cut short (training saves that step again); returns what was removed."""
    removed = [c for c in checkpoints(workdir) if not is_complete(c)]
    for checkpoint in removed:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return removed


def remove_checkpoints(workdir: Path) -> None:
    """After a finished run the checkpoints (weights + optimizer state, several GB on a 7B) are not needed."""
    for checkpoint in checkpoints(workdir):
        shutil.rmtree(checkpoint)
