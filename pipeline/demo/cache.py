"""The demo builders' cache: a directory built once, in a temporary sibling renamed into place, and reused while the
stamp it was built with (what it was built from) is unchanged."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

STAMP = ".complete"


def read_stamp(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_cached(out_dir: Path, stamp: dict, build: Callable[[Path], object]) -> Path:
    """`out_dir` as `build(work_dir)` writes it, reused while its stamp equals `stamp`; built in a temporary sibling
    and renamed into place."""
    if read_stamp(out_dir) == stamp:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(work)
        (work / STAMP).write_text(json.dumps(stamp, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir
