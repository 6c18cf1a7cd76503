"""archive: copy each trained adapter into the shared, append-only archive with a manifest of its provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.archive.store import (
    ADAPTER_FILES,
    MANIFEST,
    ArchiveError,
    already_archived,
    canonical_adapter_config,
    file_hashes,
    new_manifest,
)
from pipeline.models.hub import resolve_model
from pipeline.recipe import Recipe

NAME = "archive"
RESUMABLE = False
WRITE_ONCE = True


def items(recipe: Recipe) -> list[str]:
    return [finetune.name for finetune in recipe.finetunes]


def output_path(recipe: Recipe, item: str) -> Path:
    return Path(recipe.archive_dir) / item


def config(recipe: Recipe, item: str) -> dict:
    # Deliberately nothing but the inputs: the fingerprint then says where the adapter came from, not where the
    # archive lives, so another recipe or output_dir producing the same adapter finds it already archived.
    return {}


def depends_on(recipe: Recipe, item: str) -> list[tuple[str, str]]:
    return [("prepare", item), ("train", item)]


def check(recipe: Recipe, item: str) -> None:
    """Nothing to check that the fingerprint does not: the runner refuses an existing name from another source."""


def run(recipe: Recipe, item: str, out: Path, inputs: dict) -> dict:
    adapter = Path(inputs[("train", item)]) / "adapter"
    for name in ADAPTER_FILES:
        if not (adapter / name).is_file():
            raise ArchiveError(f"{adapter}: {name} missing; the train stage did not write a PEFT adapter")
    adapter_config = canonical_adapter_config(json.loads((adapter / "adapter_config.json").read_text()),
                                              recipe.base_model)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")
    hashes = file_hashes(out)
    final = output_path(recipe, item)
    if already_archived(final, hashes):
        return {"adapter": str(final), "already_archived": True}
    manifest = _manifest(recipe, item, Path(inputs[("prepare", item)]), Path(inputs[("train", item)]), hashes, out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"adapter": str(final), "files": hashes}


def _manifest(recipe: Recipe, item: str, prepared: Path, trained: Path, hashes: dict, out: Path) -> dict:
    from pipeline.stages import prepare

    finetune = recipe.finetune(item)
    metrics_file = trained / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    report_file = prepared / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    marker = out / ".ftmerge-fingerprint"
    return {
        "name": item,
        **new_manifest("trained", recipe.base_model, resolve_model(recipe.base_model, "base_model"),
                       target_model=recipe.target_model),
        "recipe": recipe.name,
        "fingerprint": marker.read_text() if marker.is_file() else None,
        "dataset": {**finetune.dataset.model_dump(),
                    "content_fingerprint": prepare.config(recipe, item)["dataset_content"],
                    "rows": {k: report.get(k) for k in ("rows_in", "kept", "train_rows", "eval_rows") if k in report}},
        "chat_template": recipe.chat_template,
        "train": recipe.train_config(item).model_dump(),
        "metrics": {k: metrics.get(k) for k in ("train_loss", "eval_loss", "steps", "seconds", "backend")
                    if k in metrics},
        "files": hashes,
    }
