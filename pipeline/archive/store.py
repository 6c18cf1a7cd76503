"""The adapter archive: an append-only directory of PEFT adapters, each with a manifest of where it came from.

`<archive_dir>/<name>/` holds adapter_config.json, adapter_model.safetensors and manifest.json. A name, once written,
always means the same bytes: several recipes may share one archive, and a release merge must be reproducible from it.
The manifest lists the sha256 of each file and is sealed by the sha256 of its own content (`manifest_sha256`), so an
edited manifest (another base_model, a file dropped from `files`) is caught as surely as an edited weight. Folders and
files get the permissions the user's umask gives (the archive is meant to be shared), not a temporary folder's 0700.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pipeline.fingerprint import model_fingerprint, sha256_file
from pipeline.locking import LockHeld, lock_file, try_exclusive
from pipeline.models.architecture import BASE_CONFIG_KEYS
from pipeline.recipe import NAME_PATTERN, RESERVED_SUFFIXES
from pipeline.versions import library_versions

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
SEAL = "manifest_sha256"


class ArchiveError(RuntimeError):
    """An archived adapter that is missing, corrupt or in conflict; the message names it."""


def seal(manifest: dict) -> str:
    """The sha256 of a manifest's content without its seal (keys sorted, so key order does not matter)."""
    content = {key: value for key, value in manifest.items() if key != SEAL}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: Path) -> dict:
    """The manifest, checked against its seal. Manifests written before seals existed have none and are read as
    they are (`verify` says so)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise ArchiveError(f"{path}: no {MANIFEST}; not an archived adapter")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError:  # cut short (a full disk) or edited by hand
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ArchiveError(
            f"{manifest}: not an archive manifest (a JSON object with `files`: name → sha256); the "
            "archive holds a damaged entry. Restore it from a backup, or move it out of the archive."
        )
    if SEAL in data and data[SEAL] != seal(data):
        raise ArchiveError(
            f"{manifest}: edited after the adapter was archived (its content no longer matches its {SEAL}); an "
            "archived adapter's record is never changed. Restore it from a backup, or archive the adapter again "
            "under a new name."
        )
    return data


def _entries(archive_dir: Path) -> list[Path]:
    """The archive's folders, hidden ones (locks, temporary writes) and partial or previous copies aside."""
    archive_dir = Path(archive_dir)
    if not archive_dir.is_dir():
        return []
    return [
        entry
        for entry in sorted(archive_dir.iterdir())
        if entry.is_dir() and not entry.name.startswith(".") and not entry.name.endswith((".partial", ".old"))
    ]


def archived_names(archive_dir: Path) -> list[str]:
    """The names of the complete adapters in the archive; partial writes (`*.partial`) are never listed."""
    return [entry.name for entry in _entries(archive_dir) if (entry / MANIFEST).is_file()]


def archived_adapters(archive_dir: Path) -> dict[str, dict]:
    """Every complete adapter in the archive (name → manifest). Raises ArchiveError at a damaged manifest."""
    return {name: read_manifest(Path(archive_dir) / name) for name in archived_names(archive_dir)}


def file_hashes(path: Path) -> dict[str, str]:
    return {name: sha256_file(Path(path) / name) for name in ADAPTER_FILES}


def verify_adapter(path: Path) -> dict:
    """Check that the folder holds exactly the manifest's files (hidden files aside: the runner's marker) with their
    sha256, the adapter's own two among them; returns the manifest. Raises ArchiveError naming the adapter and the
    file, so a corrupt adapter never reaches apply or merge."""
    path = Path(path)
    manifest = read_manifest(path)
    listed = set(manifest["files"])
    present = {p.name for p in path.iterdir() if not p.name.startswith(".")} - {MANIFEST}
    problems = [f"{name} is not listed in its manifest" for name in sorted(present - listed)]
    problems += [f"the manifest does not list {name}" for name in ADAPTER_FILES if name not in listed]
    if problems:
        raise ArchiveError(f"archived adapter {path.name}: {'; '.join(problems)} ({path})")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ArchiveError(f"archived adapter {path.name}: {name} is missing ({path})")
        if sha256_file(file) != expected:
            raise ArchiveError(f"archived adapter {path.name}: {name} is corrupt (sha256 differs from the manifest)")
    return manifest


def already_archived(path: Path, hashes: dict[str, str]) -> bool:
    """True when `path` holds exactly these files (a rerun: nothing to do), False when it does not exist. Raises
    ArchiveError when it holds something else, or something corrupt: a name always means the same bytes."""
    path = Path(path)
    if not path.exists():
        return False
    if verify_adapter(path)["files"] != hashes:
        raise ArchiveError(
            f"{path} already holds a different adapter named {path.name}; archived adapters are never overwritten. "
            f"Choose another name, or move {path} away by hand."
        )
    return True


def canonical_adapter_config(config: dict, base_model: str) -> dict:
    """adapter_config.json pointing at the real base, with list settings in a stable order (PEFT and mergekit
    write sets in hash order), so the same adapter always has the same bytes and re-archiving it is a no-op."""
    config = {**config, "base_model_name_or_path": base_model}
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


def new_manifest(kind: str, base_model: str, base_dir: Path, *, target_model: str | None = None, **provenance) -> dict:
    """The manifest fields every archived adapter has, whatever made it (trained, imported, extracted, combined);
    `provenance` adds what is particular to its kind."""
    config_file = Path(base_dir) / "config.json"
    base_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "base_model": base_model,
        "base_model_resolved": str(Path(base_dir).resolve()),
        "base_model_fingerprint": model_fingerprint(str(base_dir)),
        "base_config": {key: base_config[key] for key in BASE_CONFIG_KEYS if key in base_config},
        "target_model": target_model,
        **provenance,
        "versions": library_versions(),
    }


def write_adapter_files(directory: Path, adapter_config: dict, weights_file: Path) -> dict[str, str]:
    """adapter_config.json and the weights into `directory`; returns their sha256 for the manifest."""
    (Path(directory) / ADAPTER_FILES[0]).write_text(json.dumps(adapter_config, indent=2) + "\n")
    shutil.copyfile(weights_file, Path(directory) / ADAPTER_FILES[1])
    return file_hashes(directory)


def write_manifest(directory: Path, name: str, manifest: dict, hashes: dict[str, str]) -> None:
    """manifest.json, sealed, written last: an entry without one is never listed as archived."""
    content = {"name": name, **manifest, "files": hashes}
    content[SEAL] = seal(content)
    (Path(directory) / MANIFEST).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def stray_entries(archive_dir: Path) -> list[str]:
    """Folders in the archive that are no archived adapter (no manifest)."""
    return [entry.name for entry in _entries(archive_dir) if not (entry / MANIFEST).is_file()]


def share_permissions(directory: Path) -> None:
    """Folders and files as the umask gives them (a shared archive), not tempfile.mkdtemp's 0700."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for file in Path(directory).iterdir():
        if file.is_file():
            os.chmod(file, 0o666 & ~mask)


def write_adapter(
    archive_dir: Path, name: str, adapter_config: dict, weights_file: Path, manifest: dict
) -> tuple[Path, bool]:
    """Archive one adapter as `<archive_dir>/<name>/`: written into a temporary sibling and renamed into place, so a
    reader never sees half an adapter. Returns (path, written); written is False when the same name already holds
    the same files. Raises ArchiveError when it holds different ones."""
    if not re.fullmatch(NAME_PATTERN, name) or name.endswith(RESERVED_SUFFIXES):
        raise ValueError(
            f"adapter name {name!r}: use lowercase letters, digits, '.', '_' and '-' only, not "
            f"ending with {' or '.join(RESERVED_SUFFIXES)} (the archive never lists those)"
        )
    archive_dir = Path(archive_dir)
    archive_dir.mkdir(parents=True, exist_ok=True)
    final = archive_dir / name
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=archive_dir))
    try:
        with try_exclusive(lock_file(final), f"archived adapter {final}"):  # a run or another command writing it
            hashes = write_adapter_files(partial, adapter_config, weights_file)
            if already_archived(final, hashes):
                return final, False
            write_manifest(partial, name, manifest, hashes)
            share_permissions(partial)
            os.rename(partial, final)
            return final, True
    except LockHeld as error:
        raise ArchiveError(str(error)) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
