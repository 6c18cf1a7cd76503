"""Small files written whole or not at all: a run killed mid-write never leaves half a JSON file for the next run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, value: Any, *, indent: int | None = 2) -> None:
    """`value` as JSON in `path`, written beside it and renamed into place (the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(value, indent=indent, default=str) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_json(path: Path) -> Any | None:
    """A JSON file's value; None when it is missing or unreadable (a cache entry or state cut short)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, a file where a folder should be, cut short, not UTF-8
        return None
