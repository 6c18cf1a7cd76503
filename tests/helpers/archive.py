"""Archive entries as the archive stage writes them, for tests that need adapters without training them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.archive.store import file_hashes

ADAPTERS = ("alpha", "beta", "gamma")  # the `archive` fixture's adapters, in its order


def archive_adapter(adapter: Path, archive_dir: Path, name: str, base: str) -> Path:
    """An archive entry as the archive stage writes it (the fields apply and merge read)."""
    entry = archive_dir / name
    entry.mkdir(parents=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(adapter / file, entry / file)
    manifest = {
        "name": name,
        "base_model": base,
        "dataset": {"path": f"data/{name}.jsonl"},
        "train": {"lora": {"r": 8, "alpha": 16}, "learning_rate": 2e-4},
        "files": file_hashes(entry),
    }
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry
