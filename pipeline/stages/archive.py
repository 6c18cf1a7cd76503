"""archive: copy each trained adapter into the shared, append-only archive with a manifest of its provenance."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.archive.store import (
    ADAPTER_FILES,
    ArchiveError,
    already_archived,
    canonical_adapter_config,
    new_manifest,
    write_adapter_files,
    write_manifest,
)
from pipeline.models.hub import resolve_model
from pipeline.recipe import Recipe
from pipeline.stages.contract import FINGERPRINT_FILE, Inputs, Stage, StageRef, each_finetune
from pipeline.stages.selection import archive_entry


def config(recipe: Recipe, item: str) -> dict:
    # Deliberately nothing but the inputs: the fingerprint then says where the adapter came from, not where the
    # archive lives, so another recipe or output_dir producing the same adapter finds it already archived.
    return {}


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    return [StageRef("prepare", item), StageRef("train", item)]


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    """The runner renames `out` into the archive, so the files are written here rather than by `write_adapter`
    (which renames its own temporary directory)."""
    adapter = inputs.path("train", item) / "adapter"
    for name in ADAPTER_FILES:
        if not (adapter / name).is_file():
            raise ArchiveError(f"{adapter}: {name} missing; the train stage did not write a PEFT adapter")
    adapter_config = canonical_adapter_config(
        json.loads((adapter / "adapter_config.json").read_text()), recipe.base_model
    )
    hashes = write_adapter_files(out, adapter_config, adapter / "adapter_model.safetensors")
    final = archive_entry(recipe, item)
    if already_archived(final, hashes):
        return {"adapter": str(final), "already_archived": True}
    write_manifest(out, item, _manifest(recipe, item, inputs, out), hashes)
    return {"adapter": str(final), "files": hashes}


def _manifest(recipe: Recipe, item: str, inputs: Inputs, out: Path) -> dict:
    finetune = recipe.finetune(item)
    metrics = _read_json(inputs.path("train", item) / "metrics.json")
    report = _read_json(inputs.path("prepare", item) / "report.json")
    marker = out / FINGERPRINT_FILE
    return {
        **new_manifest(
            "trained",
            recipe.base_model,
            resolve_model(recipe.base_model, "base_model"),
            target_model=recipe.target_model,
        ),
        "recipe": recipe.name,
        "fingerprint": marker.read_text() if marker.is_file() else None,
        "dataset": {
            **finetune.dataset.model_dump(),
            "content_fingerprint": report.get("dataset_content"),
            "rows": {k: report.get(k) for k in ("rows_in", "kept", "train_rows", "eval_rows") if k in report},
        },
        "chat_template": recipe.chat_template,
        "train": recipe.train_config(item).model_dump(),
        "metrics": {
            k: metrics.get(k) for k in ("train_loss", "eval_loss", "steps", "seconds", "backend") if k in metrics
        },
    }


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# check: nothing the fingerprint does not cover; the runner refuses an existing name from another source.
STAGE = Stage(
    "archive", config, run, items=each_finetune, depends_on=depends_on, output_path=archive_entry, write_once=True
)
