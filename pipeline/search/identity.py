"""The name of a search's Optuna study: the same on every machine that runs the same recipe on the same inputs, and
another one when the inputs change (so a database shared by many searches never mixes their trials).

It hashes what the trials depend on by content: settings, the adapters' sha256, the scored splits, and the models by
`portable_model_identity`. Paths and file times never enter it: a copy of the models or the archive on another
machine has other ones, and `fingerprint.model_fingerprint` (which the runner uses to tell whether a stage is done on
this machine) reads weight files' modification times.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.fingerprint import hash_json, sha256_file

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".gguf"}
SAMPLE_BYTES = 1 << 20


def study_name(recipe_name: str, identity: dict) -> str:
    return f"{recipe_name}-{hash_json(identity)[:12]}"


def portable_model_identity(name_or_path: str) -> str:
    """A Hub id as given; for a local directory, the content of its small files (config, tokenizer), and each weight
    file's name, size and the sha256 of its first and last MiB (the header and tensors at both ends): a model
    trained again under the same name changes them, and reading them costs milliseconds, not a pass over 15 GB."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return hash_json({"hub_id": name_or_path})
    entries = []
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix in WEIGHT_SUFFIXES:
            entries.append([file.name, file.stat().st_size, _ends_sha256(file)])
        else:
            entries.append([file.name, sha256_file(file)])
    return hash_json(entries)


def _ends_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        handle.seek(max(0, path.stat().st_size - SAMPLE_BYTES))
        digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()
