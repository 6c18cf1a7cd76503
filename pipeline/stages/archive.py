"""archive: copy each trained adapter into the shared, append-only archive with a manifest of its provenance."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pipeline.archive.store import ADAPTER_FILES, MANIFEST, ArchiveError, file_hashes, verify_adapter
from pipeline.fingerprint import model_fingerprint
from pipeline.recipe import Recipe
from pipeline.versions import library_versions

NAME = "archive"
RESUMABLE = False
WRITE_ONCE = True
BASE_CONFIG_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size")


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
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = recipe.base_model
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")
    hashes = file_hashes(out)
    final = output_path(recipe, item)
    if final.exists():
        existing = verify_adapter(final)
        if existing["files"] != hashes:
            raise ArchiveError(
                f"{final} already holds a different adapter named {item}; archived adapters are never overwritten. "
                f"Rename the fine-tune (finetunes[].name) or move {final} away by hand.")
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
    base = Path(recipe.base_model)
    base_config = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    marker = out / ".ftmerge-fingerprint"
    return {
        "name": item,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.name,
        "fingerprint": marker.read_text() if marker.is_file() else None,
        "kind": "trained",
        "base_model": recipe.base_model,
        "base_model_resolved": str(base.resolve()) if base.is_dir() else recipe.base_model,
        "base_model_fingerprint": model_fingerprint(recipe.base_model),
        "base_config": {key: base_config[key] for key in BASE_CONFIG_KEYS if key in base_config},
        "target_model": recipe.target_model,
        "dataset": {**finetune.dataset.model_dump(),
                    "content_fingerprint": prepare.config(recipe, item).get("data_fingerprint"),
                    "rows": {k: report.get(k) for k in ("rows_in", "kept", "train_rows", "eval_rows") if k in report}},
        "chat_template": recipe.chat_template,
        "train": recipe.train_config(item).model_dump(),
        "metrics": {k: metrics.get(k) for k in ("train_loss", "eval_loss", "steps", "seconds", "backend")
                    if k in metrics},
        "versions": library_versions(),
        "files": hashes,
    }
