"""The adapter archive: an append-only directory of PEFT adapters, each with a manifest of where it came from.

`<archive_dir>/<name>/` holds adapter_config.json, adapter_model.safetensors and manifest.json. A name, once written,
always means the same bytes: several recipes may share one archive, and a release merge must be reproducible from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pipeline.fingerprint import model_fingerprint, sha256_file
from pipeline.recipe import NAME_PATTERN, RESERVED_SUFFIXES, Recipe, RecipeError
from pipeline.versions import library_versions

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
# The base's config.json keys a manifest keeps: enough to tell whether a target has the same architecture.
BASE_CONFIG_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size")


class ArchiveError(RuntimeError):
    """An archived adapter that is missing, corrupt or in conflict; the message names it."""


def adapter_dir(recipe: Recipe, name: str) -> Path:
    return Path(recipe.archive_dir) / name


def read_manifest(path: Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise ArchiveError(f"{path}: no {MANIFEST}; not an archived adapter")
    try:
        data = json.loads(manifest.read_text())
    except ValueError:  # cut short (a full disk) or edited by hand
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ArchiveError(f"{manifest}: not an archive manifest (a JSON object with `files`: name → sha256); the "
                           "archive holds a damaged entry. Restore it from a backup, or move it out of the archive.")
    return data


def archived_names(archive_dir: Path) -> list[str]:
    """The names of the complete adapters in the archive; partial writes (`*.partial`) are never listed."""
    archive_dir = Path(archive_dir)
    if not archive_dir.is_dir():
        return []
    return [entry.name for entry in sorted(archive_dir.iterdir())
            if entry.is_dir() and (entry / MANIFEST).is_file() and not entry.name.startswith(".")
            and not entry.name.endswith((".partial", ".old"))]


def archived_adapters(archive_dir: Path) -> dict[str, dict]:
    """Every complete adapter in the archive (name → manifest). Raises ArchiveError at a damaged manifest."""
    return {name: read_manifest(Path(archive_dir) / name) for name in archived_names(archive_dir)}


def file_hashes(path: Path) -> dict[str, str]:
    return {name: sha256_file(Path(path) / name) for name in ADAPTER_FILES}


def verify_adapter(path: Path) -> dict:
    """Check every file against the sha256 in the manifest; returns the manifest. Raises ArchiveError naming the
    adapter and the file, so a corrupt adapter never reaches apply or merge."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ArchiveError(f"archived adapter {path.name}: {name} is missing ({path})")
        if sha256_file(file) != expected:
            raise ArchiveError(f"archived adapter {path.name}: {name} is corrupt (sha256 differs from the manifest)")
    return manifest


def selected_adapters(recipe: Recipe) -> list[str]:
    """The adapters the merge uses: with `merge.adapters: all`, the recipe's own fine-tunes (in recipe order) and then
    every archived adapter trained on the same base; with a list, those names, each of which must be one of the
    recipe's fine-tunes or already archived."""
    own = [finetune.name for finetune in recipe.finetunes]
    archived = archived_adapters(Path(recipe.archive_dir))
    if recipe.merge.adapters == "all":
        same_base = [name for name, manifest in archived.items()
                     if manifest.get("base_model") == recipe.base_model and name not in own]
        return own + same_base
    unknown = [name for name in recipe.merge.adapters if name not in own and name not in archived]
    if unknown:
        holds = ", ".join(archived) or "nothing yet"
        raise RecipeError(
            f"merge.adapters: {unknown} are neither fine-tunes of this recipe nor in the archive "
            f"{recipe.archive_dir} (it holds: {holds})"
        )
    return list(recipe.merge.adapters)


def check_trained_on_base(recipe: Recipe, names: list[str]) -> None:
    """Refuse archived adapters (named in `merge.adapters`) that were trained on another base than the recipe's: the
    merge takes the recipe's base as the reference its task vectors are measured from, and same-shaped models (Qwen2
    and Qwen2.5) would pass every shape check. Compared as `merge.adapters: all` selects: by the base as named."""
    own = {finetune.name for finetune in recipe.finetunes}
    archive_dir = Path(recipe.archive_dir)
    other = {name: read_manifest(archive_dir / name).get("base_model") for name in names if name not in own}
    other = {name: base for name, base in other.items() if base != recipe.base_model}
    if other:
        listing = ", ".join(f"{name} (base {base})" for name, base in other.items())
        raise RecipeError(f"merge.adapters: {listing} were not trained on this recipe's base_model "
                          f"{recipe.base_model}. Leave them out, or archive them for this base (`python -m "
                          "pipeline.archive add ... --base`) if it is the same model under another name.")


def already_archived(path: Path, hashes: dict[str, str]) -> bool:
    """True when `path` holds exactly these files (a rerun: nothing to do), False when it does not exist. Raises
    ArchiveError when it holds something else, or something corrupt: a name always means the same bytes."""
    path = Path(path)
    if not path.exists():
        return False
    if verify_adapter(path)["files"] != hashes:
        raise ArchiveError(
            f"{path} already holds a different adapter named {path.name}; archived adapters are never overwritten. "
            f"Choose another name, or move {path} away by hand.")
    return True


def canonical_adapter_config(config: dict, base_model: str) -> dict:
    """adapter_config.json pointing at the real base, with list settings in a stable order (PEFT and mergekit
    write sets in hash order), so the same adapter always has the same bytes and re-archiving it is a no-op."""
    config = {**config, "base_model_name_or_path": base_model}
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


def new_manifest(kind: str, base_model: str, base_dir: Path, *, target_model: str | None = None,
                 **provenance) -> dict:
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


def write_adapter(archive_dir: Path, name: str, adapter_config: dict, weights_file: Path,
                  manifest: dict) -> tuple[Path, bool]:
    """Archive one adapter as `<archive_dir>/<name>/`: written into a temporary sibling and renamed into place, so a
    reader never sees half an adapter. Returns (path, written); written is False when the same name already holds
    the same files. Raises ArchiveError when it holds different ones."""
    if not re.fullmatch(NAME_PATTERN, name) or name.endswith(RESERVED_SUFFIXES):
        raise ArchiveError(f"adapter name {name!r}: use lowercase letters, digits, '.', '_' and '-' only, not "
                           f"ending with {' or '.join(RESERVED_SUFFIXES)} (the archive never lists those)")
    archive_dir = Path(archive_dir)
    archive_dir.mkdir(parents=True, exist_ok=True)
    final = archive_dir / name
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=archive_dir))
    try:
        (partial / ADAPTER_FILES[0]).write_text(json.dumps(adapter_config, indent=2) + "\n")
        shutil.copyfile(weights_file, partial / ADAPTER_FILES[1])
        hashes = file_hashes(partial)
        if already_archived(final, hashes):
            return final, False
        (partial / MANIFEST).write_text(json.dumps({"name": name, **manifest, "files": hashes}, indent=2) + "\n")
        try:
            os.rename(partial, final)
        except OSError:  # another process archived this name meanwhile: fine if it is the same adapter
            if already_archived(final, hashes):
                return final, False
            raise
        return final, True
    finally:
        shutil.rmtree(partial, ignore_errors=True)
