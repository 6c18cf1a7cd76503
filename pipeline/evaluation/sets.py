"""The sets each model is scored on: every fine-tune's held-out split as prepare wrote it (does the model learn?)
and the recipe's retention sets, rendered and tokenized by prepare's own functions (does it forget?)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import load_from_disk

from pipeline.data import loading, render
from pipeline.evaluation.generate import reference_answer
from pipeline.evaluation.lineage import EvalSet

if TYPE_CHECKING:
    from pipeline.data.templates import ChatFormat
    from pipeline.recipe import RetentionSet

COLUMNS = ("input_ids", "assistant_masks")


class EvalSetError(ValueError):
    """A set that cannot be scored; the message names the file and the column or row."""


def rows_to_set(name: str, kind: str, source: str, dataset, max_samples: int | None) -> EvalSet:
    """The first `max_samples` rows of a prepared dataset. Without a `messages` column (format text) there is no
    reference answer, and the set is scored by loss only."""
    missing = [column for column in COLUMNS if column not in dataset.column_names]
    if missing:
        raise EvalSetError(f"{source}: columns {missing} missing (has {dataset.column_names})")
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    has_messages = "messages" in dataset.column_names
    rows = dataset.select_columns([*COLUMNS, *(["messages"] if has_messages else [])]).to_list()
    for index, row in enumerate(rows):
        if len(row["input_ids"]) != len(row["assistant_masks"]) or not any(row["assistant_masks"]):
            raise EvalSetError(
                f"{source}: row {index}: needs as many mask bits as ids ({len(row['input_ids'])} ids,"
                f" {len(row['assistant_masks'])} bits) and at least one assistant token"
            )
    references = [reference_answer(r["messages"]) for r in rows] if has_messages else None
    return EvalSet(name, kind, source, [r["input_ids"] for r in rows], [r["assistant_masks"] for r in rows], references)


def held_out_set(name: str, prepare_dir: Path, max_samples: int | None) -> EvalSet:
    path = Path(prepare_dir) / "eval"
    if not path.is_dir():
        raise EvalSetError(f"{path}: missing; the prepare stage writes the held-out split there with save_to_disk")
    return rows_to_set(name, "held-out", str(path), load_from_disk(str(path)), max_samples)


def retention_set(
    retention: RetentionSet, chat: ChatFormat, work_dir: Path, *, max_length: int, max_samples: int | None
) -> EvalSet:
    """A retention dataset rendered and tokenized by prepare's own code path (same template, base tokenizer,
    end-of-turn token, assistant mask, `max_length` = train.max_seq_length), every usable row kept (no split): rows
    prepare would reject are left out and counted in the set's description."""
    dataset = retention.dataset
    settings = render.settings_for(dataset, chat, max_length)
    source = loading.load_source(dataset, Path(work_dir) / "source")
    limit = min(n for n in (dataset.max_samples, max_samples, len(source)) if n is not None)
    source = source.select(range(limit))
    processed = render.render_dataset(
        source, settings, chat.tokenizer, str(Path(work_dir) / f"{retention.name}.arrow"), f"retention {retention.name}"
    )
    kept = render.kept_rows(processed)
    if not len(kept):
        raise EvalSetError(
            f"retention set {retention.name}: none of the first {limit} rows of {dataset.path} "
            f"could be rendered as format {dataset.format} (first reason: {processed[0]['reason']}: "
            f"{processed[0]['detail']})"
        )
    eval_set = rows_to_set(retention.name, "retention", dataset.path, kept, None)
    return replace(eval_set, rejected=limit - len(kept))


def retention_sets(
    retention: list[RetentionSet],
    chat: ChatFormat,
    work_dir: Path,
    *,
    max_length: int,
    max_samples: int | None,
    names: set[str] | None = None,
) -> list[EvalSet]:
    """The retention sets (those in `names`, or all), each from its first `max_samples` rows."""
    return [
        retention_set(r, chat, work_dir, max_length=max_length, max_samples=max_samples)
        for r in retention
        if names is None or r.name in names
    ]
