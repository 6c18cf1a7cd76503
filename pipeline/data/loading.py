"""Source datasets: local json/jsonl/parquet/csv files or directories of them, or Hub ids, as a `datasets.Dataset`.

JSON Lines files are read one line per row as raw text (column `raw`) and parsed row by row later, so one malformed
line or one field of the wrong type becomes a rejected row with its index instead of failing the whole load.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from pipeline.errors import ConfigProblem
from pipeline.models.hub import HUB_ID
from pipeline.recipe import DatasetConfig

BUILDERS = {".jsonl": "text", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
RAW_COLUMN = "raw"
PEEK_ROWS = 1000  # rows read at check time to see which columns a local file has
WHOLE_JSON_BYTES = 1 << 30  # a .json document up to this size is parsed once to point at a syntax error


class DatasetUnavailable(RuntimeError):
    """A dataset that cannot be read; the message names the path and the fix."""


class DatasetFileError(RuntimeError):
    """A local data file that cannot be read as its type: the message names the file, the line and the cause."""


class DatasetPathError(ConfigProblem):
    """A dataset path that holds no data this loader reads; `where` is `("path",)` inside the dataset settings."""

    def __init__(self, message: str):
        super().__init__(message, ("path",))


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
        raise DatasetPathError(f"{unsupported[0]} is not a supported file ({', '.join(BUILDERS)})")
    if not files:
        raise DatasetPathError(f"{path} holds no {', '.join(BUILDERS)} files")
    kinds = sorted({f.suffix for f in files})
    if len(kinds) > 1:
        raise DatasetPathError(f"{path} mixes file types {kinds}; keep one type per directory")
    return files


def check_dataset_path(dataset: DatasetConfig) -> None:
    """Cheap check before anything runs: a local path exists and holds data files, or the path looks like a Hub id."""
    path = Path(dataset.path).expanduser()
    if path.exists():
        local_data_files(path)
    elif dataset.path.startswith((".", "/", "~")) or not HUB_ID.match(dataset.path):
        raise DatasetPathError(f"dataset file or directory not found: {dataset.path} (nor is it a Hub id)")


def peek_columns(files: list[Path]) -> set[str] | None:
    """The columns of the first rows of local data files, read cheaply (JSON Lines: the keys of the first rows'
    objects; CSV: its header; Parquet: its schema); None for a .json document or a file that cannot be peeked."""
    import csv

    columns: set[str] = set()
    for file in files:
        try:
            if file.suffix == ".jsonl":
                with open(file, encoding="utf-8") as handle:
                    for line in itertools.islice((line for line in handle if line.strip()), PEEK_ROWS):
                        row = json.loads(line)
                        columns |= set(row) if isinstance(row, dict) else set()
            elif file.suffix == ".csv":
                with open(file, encoding="utf-8", newline="") as handle:
                    columns |= set(next(csv.reader(handle), []))
            elif file.suffix == ".parquet":
                import pyarrow.parquet as pq

                columns |= set(pq.read_schema(file).names)
            else:
                return None
        except (OSError, ValueError):  # unreadable here: the loader says why when the stage runs
            return None
    return columns


def check_readable(files: list[Path]) -> None:
    """A clear error naming the file, the line and the cause, before `datasets` turns it into a generation error:
    text that is not UTF-8, a file with no rows, a .json document cut short."""
    for file in files:
        if file.suffix in (".jsonl", ".json", ".csv"):
            rows = 0
            with open(file, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as error:
                        raise DatasetFileError(
                            f"{file}, line {number}: not UTF-8 text (byte 0x{line[error.start]:02x} at column "
                            f"{error.start + 1}); save the file as UTF-8"
                        ) from None
                    rows += bool(text.strip())
            if not rows:
                raise DatasetFileError(f"{file}: empty, no rows to read")
        if file.suffix == ".json" and file.stat().st_size <= WHOLE_JSON_BYTES:
            _check_json_document(file)


def _check_json_document(file: Path) -> None:
    """A .json file is one JSON document, or JSON Lines (which `datasets` also reads)."""
    text = file.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as document_error:
        try:
            for line in text.splitlines():
                if line.strip():
                    json.loads(line)
        except json.JSONDecodeError:
            raise DatasetFileError(
                f"{file}, line {document_error.lineno}, column {document_error.colno}: not valid JSON "
                f"({document_error.msg}; a file cut short?)"
            ) from None


def load_source(dataset: DatasetConfig, cache_dir: Path):
    """The source rows as a Dataset (`raw` lines for JSON Lines). `cache_dir` receives datasets' Arrow files."""
    import datasets

    path = Path(dataset.path).expanduser()
    if path.exists():
        files = local_data_files(path)
        check_readable(files)
        builder = BUILDERS[files[0].suffix]
        try:
            loaded = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir)
            )
        except datasets.exceptions.DatasetGenerationError as error:
            raise DatasetFileError(f"{path}: {builder} rows cannot be read: {_root_cause(error)}") from None
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


def _root_cause(error: BaseException) -> str:
    """The innermost exception `datasets` wrapped, as `Type: message` (its own says only that generation failed)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
