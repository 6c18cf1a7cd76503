"""Source datasets: local json/jsonl/parquet/csv files or directories of them, or Hub ids, as a `datasets.Dataset`.

JSON Lines files are read one line per row as raw text (column `raw`) and parsed row by row later, so one malformed
line or one field of the wrong type becomes a rejected row with its index instead of failing the whole load.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.models.hub import HUB_ID
from pipeline.recipe import DatasetConfig, RecipeError

BUILDERS = {".jsonl": "text", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
RAW_COLUMN = "raw"


class DatasetUnavailable(RuntimeError):
    """A dataset that cannot be read; the message names the path and the fix."""


def local_data_files(path: Path) -> list[Path]:
    """The data files of a local dataset path (a file, or every supported file under a directory)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    unsupported = [f for f in files if f.suffix not in BUILDERS]
    if unsupported:
        raise RecipeError(f"dataset.path: {unsupported[0]} is not a supported file ({', '.join(BUILDERS)})")
    if not files:
        raise RecipeError(f"dataset.path: {path} holds no {', '.join(BUILDERS)} files")
    kinds = sorted({f.suffix for f in files})
    if len(kinds) > 1:
        raise RecipeError(f"dataset.path: {path} mixes file types {kinds}; keep one type per directory")
    return files


def check_dataset_path(dataset: DatasetConfig, key: str) -> None:
    """Cheap check before anything runs: a local path exists and holds data files, or the path looks like a Hub id."""
    path = Path(dataset.path).expanduser()
    if path.exists():
        local_data_files(path)
    elif dataset.path.startswith((".", "/", "~")) or not HUB_ID.match(dataset.path):
        raise RecipeError(f"{key}.path: dataset file or directory not found: {dataset.path} (nor is it a Hub id)")


def load_source(dataset: DatasetConfig, cache_dir: Path):
    """The source rows as a Dataset (`raw` lines for JSON Lines). `cache_dir` receives datasets' Arrow files."""
    import datasets

    path = Path(dataset.path).expanduser()
    if path.exists():
        files = local_data_files(path)
        builder = BUILDERS[files[0].suffix]
        loaded = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir)
        )
        return loaded.rename_column("text", RAW_COLUMN) if builder == "text" else loaded
    try:
        return datasets.load_dataset(dataset.path, split=dataset.split)
    except Exception as error:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError...)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(error).splitlines()[0]
        raise DatasetUnavailable(
            f"dataset {dataset.path} (split {dataset.split}) cannot be loaded from the Hugging Face Hub: {why}. "
            "Download it where there is network (`hf download --repo-type dataset "
            f"{dataset.path}`) or point dataset.path to local files."
        ) from None
