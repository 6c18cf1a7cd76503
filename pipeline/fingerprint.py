"""Fingerprints: short stable hashes of what a stage's output depends on.

A stage is redone when its fingerprint changes, so a fingerprint must change whenever the output would: the stage's
config, the content of its local input files, and the fingerprints of the stages it reads from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 8 * 1024 * 1024


def hash_json(value: Any) -> str:
    encoded = json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_fingerprint(path: Path) -> str:
    """sha256 over the bytes of a file, or of every file under a directory (names included) outside hidden files
    and directories, which the dataset loader skips too (a `.git/` or `.cache/` beside the data changes often)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    files = (
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    for file in sorted(files):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


def model_fingerprint(name_or_path: str) -> str:
    """Identity of a model without reading its weights: a Hub id with the commit it resolves to (a new revision on
    the Hub is a new model), or for a local directory the content of its small files plus the names, sizes and
    modification times of its weight files (hashing 15 GB per run would cost minutes; a rewritten weight file
    changes its mtime)."""
    path = Path(name_or_path)
    if not path.is_dir():
        from pipeline.models.hub import hub_revision

        return hash_json({"hub_id": name_or_path, "revision": hub_revision(name_or_path)})
    entries = []
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix in {".safetensors", ".bin", ".pt", ".gguf"}:
            stat = file.stat()
            entries.append([file.name, stat.st_size, stat.st_mtime_ns])
        else:
            entries.append([file.name, sha256_file(file)])
    return hash_json(entries)
