"""The adapter archive: an append-only directory of PEFT adapters, each with a manifest of where it came from.

`<archive_dir>/<name>/` holds adapter_config.json, adapter_model.safetensors and manifest.json. A name, once written,
always means the same bytes: several recipes may share one archive, and a release merge must be reproducible from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.fingerprint import sha256_file
from pipeline.recipe import Recipe, RecipeError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"


class ArchiveError(RuntimeError):
    """An archived adapter that is missing, corrupt or in conflict; the message names it."""


def adapter_dir(recipe: Recipe, name: str) -> Path:
    return Path(recipe.archive_dir) / name


def read_manifest(path: Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise ArchiveError(f"{path}: no {MANIFEST}; not an archived adapter")
    return json.loads(manifest.read_text())


def archived_adapters(archive_dir: Path) -> dict[str, dict]:
    """Every complete adapter in the archive (name → manifest). Partial writes (`*.partial`) are never listed."""
    archive_dir = Path(archive_dir)
    if not archive_dir.is_dir():
        return {}
    found = {}
    for entry in sorted(archive_dir.iterdir()):
        complete = entry.is_dir() and (entry / MANIFEST).is_file()
        if complete and not entry.name.startswith(".") and not entry.name.endswith((".partial", ".old")):
            found[entry.name] = read_manifest(entry)
    return found


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
