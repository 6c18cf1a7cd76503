"""What the runner needs to know under `accelerate launch` or `torchrun`: which process may write."""

from __future__ import annotations

import os
import time
from pathlib import Path


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def wait_for_partial(partial: Path, marker_name: str, fingerprint: str, timeout: float = 600) -> Path:
    """Non-main ranks wait until rank 0 has prepared the shared working directory of this fingerprint."""
    marker = partial / marker_name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text() == fingerprint:
            return partial
        time.sleep(0.5)
    raise TimeoutError(f"rank {rank()}: rank 0 did not prepare {partial} within {timeout:.0f}s")
