"""prepare: source rows → conversations → text rendered with the chat template → base-tokenizer ids and the mask of
the tokens the loss counts, split into train/eval and saved with `save_to_disk`.

Output (the train stage's input): `train/` and `eval/` with columns `messages` (not for format text), `text`,
`input_ids`, `assistant_masks`; `report.json`, `rejected.jsonl` (row index + reason code) and `template.jinja`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import console
from pipeline.data import formats, loading, templates
from pipeline.fingerprint import content_fingerprint, model_fingerprint
from pipeline.models.hub import check_model_reference
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, each_finetune, problems_at

if TYPE_CHECKING:
    from datasets import Dataset

PARALLEL_FROM_ROWS = 20_000  # below this, worker start-up costs more than it saves


def dataset_content(path: str) -> str | None:
    """The content fingerprint of a local dataset file or directory; None for a Hub dataset (named by its id)."""
    local = Path(path).expanduser()
    return content_fingerprint(local) if local.exists() else None


def config(recipe: Recipe, item: str) -> dict:
    finetune = recipe.finetune(item)
    dataset = finetune.dataset
    train = recipe.train_config(item)
    settings = {
        "dataset": result_settings(dataset),
        "dataset_content": dataset_content(dataset.path),
        "chat_template": recipe.chat_template,
        "template_identity": templates.template_identity(recipe.chat_template, recipe.target_model),
        "base_tokenizer": templates.tokenizer_fingerprint(recipe.base_model),
        "max_seq_length": train.max_seq_length,
        "seed": train.seed,
        "train_on_responses_only": train.train_on_responses_only,
    }
    if finetune.replay is not None:  # the base writes the replay rows: its weights change them
        settings["replay"] = {
            **result_settings(finetune.replay),
            "dataset_content": dataset_content(finetune.replay.dataset.path),
            "base_model": model_fingerprint(recipe.base_model),
            "trust_remote_code": recipe.trust_remote_code,
        }
    return settings


def check(recipe: Recipe, item: str) -> None:
    index = each_finetune(recipe).index(item)
    dataset = recipe.finetune(item).dataset
    key = f"finetunes.{index}.dataset"
    _check_dataset(dataset, key)
    if dataset.eval_size >= 1 and dataset.eval_size != int(dataset.eval_size):
        raise RecipeError(f"{key}.eval_size: {dataset.eval_size} is neither a fraction (< 1) nor a row count")
    with problems_at("chat_template"):
        templates.check_template(recipe.chat_template, recipe.target_model)
    replay = recipe.finetune(item).replay
    if replay is not None:
        key = f"finetunes.{index}.replay.dataset"
        _check_dataset(replay.dataset, key)
        if replay.dataset.format == "text":
            raise RecipeError(
                f"{key}.format: text has no prompts for the base to answer; give a dataset of conversations "
                "(alpaca, sharegpt or messages: each row up to its last user turn is a prompt)"
            )
        with problems_at():
            check_model_reference(recipe.base_model, "base_model")


def _check_dataset(dataset, key: str) -> None:
    """The dataset's files exist (or it names a Hub dataset) and its `columns` name fields of its format that its
    rows have."""
    with problems_at(key):
        loading.check_dataset_path(dataset)
    known = formats.FORMAT_FIELDS[dataset.format]
    unknown = sorted(set(dataset.columns) - set(known))
    if unknown:
        raise RecipeError(
            f"{key}.columns: {unknown} are not fields of format {dataset.format}; columns maps a field "
            f"({', '.join(known)}) to the source column that holds it"
        )
    _check_mapped_columns(dataset, key)


def _check_mapped_columns(dataset, key: str) -> None:
    """Each column `dataset.columns` maps a field to is in the local file's first rows: a typo there would
    otherwise reject every row as missing the field."""
    path = Path(dataset.path).expanduser()
    mapped = {f: c for f, c in dataset.columns.items() if f not in formats.TURN_FIELDS}
    if not mapped or not path.exists():
        return
    files = loading.local_data_files(path)
    present = loading.peek_columns(files)
    absent = {f: c for f, c in mapped.items() if present is not None and c not in present}
    if absent:
        listing = ", ".join(f"{field} → {column!r}" for field, column in absent.items())
        raise RecipeError(
            f"{key}.columns: {listing}: no such column in {files[0]}"
            + (" and the other files" if len(files) > 1 else "")
            + f" (its rows have: {', '.join(sorted(present)) or 'nothing'})"
        )


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from datasets import concatenate_datasets

    from pipeline.data import render, report

    dataset = recipe.finetune(item).dataset
    train = recipe.train_config(item)
    chat = templates.chat_format(recipe.chat_template, recipe.base_model, recipe.target_model, recipe.trust_remote_code)
    settings = render.settings_for(dataset, chat, train.max_seq_length, train.train_on_responses_only)

    work = out / "_work"
    source = loading.load_source(dataset, work / "source")
    if dataset.max_samples:
        source = source.select(range(min(dataset.max_samples, len(source))))
    processed = render.render_dataset(
        source,
        settings,
        chat.tokenizer,
        str(work / "processed.arrow"),
        f"prepare {item}",
        num_proc=os.cpu_count() if len(source) >= PARALLEL_FROM_ROWS else None,
    )
    selection = _select(processed, len(source), dataset, train.seed, out)
    unique = selection.unique
    columns = [c for c in unique.column_names if c not in render.HELPER_COLUMNS]
    train_split = unique.select(selection.train_rows).select_columns(columns)
    replay = None
    if recipe.finetune(item).replay is not None:
        replay, replayed = _replay(recipe, item, chat, len(selection.train_rows), work)
        train_split = concatenate_datasets([train_split, replayed.select_columns(columns)])
    _save(train_split, out / "train")
    _save(unique.select(selection.eval_rows).select_columns(columns), out / "eval")

    summary = {
        **selection.counts(len(source)),
        "train_rows": len(train_split),
        "eval_rows": len(selection.eval_rows),
        "token_length": report.length_percentiles(unique),
        "end_of_turn_token": chat.end_of_turn,
        "chat_template": recipe.chat_template,
        "format": dataset.format,
        "max_seq_length": train.max_seq_length,
        "dataset_content": dataset_content(dataset.path),  # the archive's manifest records it
    }
    if replay is not None:
        summary["replay"] = replay
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "template.jinja").write_text(chat.template, encoding="utf-8")
    del source, processed, selection, unique, train_split
    shutil.rmtree(work, ignore_errors=True)
    _notify(item, summary, dataset.path, STAGE.output_path(recipe, item) / "rejected.jsonl")
    kept_keys = ("rows_in", "kept", "rejected", "deduplicated", "train_rows", "eval_rows")
    return {key: summary[key] for key in kept_keys} | ({"replay_rows": replay["rows"]} if replay else {})


@dataclass
class Selection:
    """The rendered rows a fine-tune keeps: rejected ones written out and counted, duplicates dropped, the rest split
    into train and held-out rows (indices into `unique`)."""

    rejected_by_reason: Counter
    kept: int
    truncated: int
    unique: Dataset
    train_rows: list[int]
    eval_rows: list[int]

    def counts(self, rows_in: int) -> dict:
        return {
            "rows_in": rows_in,
            "kept": len(self.unique),
            "rejected": sum(self.rejected_by_reason.values()),
            "rejected_by_reason": dict(self.rejected_by_reason.most_common()),
            "deduplicated": self.kept - len(self.unique),
            "truncated": self.truncated,
        }


def _select(processed, rows_in: int, dataset, seed: int, out: Path) -> Selection:
    """Rejected rows to `rejected.jsonl` (refused past `max_reject_fraction`), duplicates dropped, the split drawn."""
    from pipeline.data import render, report

    counts = report.reason_counts(processed)
    rejected = render.rejected_rows(processed)
    report.write_rejected(rejected, out / "rejected.jsonl")  # first: when too many are rejected, the user reads it
    report.check_reject_fraction(
        counts, rows_in, dataset.max_reject_fraction, rejected, dataset.path, out / "rejected.jsonl"
    )
    kept = render.kept_rows(processed)
    truncated = sum(1 for batch in kept.select_columns(["detail"]).iter(10_000) for d in batch["detail"] if d)
    unique = kept.select(_first_occurrences(kept))
    try:
        train_rows, eval_rows = split_indices(len(unique), dataset.eval_size, seed)
    except ValueError as error:
        raise ValueError(
            f"{error} ({dataset.path}: {rows_in} rows read, {rows_in - len(kept)} rejected, "
            f"{len(kept) - len(unique)} duplicates removed)"
        ) from None
    return Selection(counts, len(kept), truncated, unique, train_rows, eval_rows)


def _replay(recipe: Recipe, item: str, chat, own_rows: int, work: Path):
    """The replay rows of a fine-tune, rendered as its own rows are: (the report's replay section, the rows)."""
    import datasets

    from pipeline.data import render, replay, report
    from pipeline.models.hub import resolve_model

    settings = recipe.finetune(item).replay
    train = recipe.train_config(item)
    base_dir = resolve_model(recipe.base_model, "base_model", trust_remote_code=recipe.trust_remote_code)
    rows = replay.replay_rows(
        base_dir,
        settings,
        chat,
        count=replay.replay_count(own_rows, settings.fraction),
        seed=train.seed,
        work_dir=work / "replay_source",
        cache_dir=Path(recipe.output_dir) / "cache" / "replay",
        trust_remote_code=recipe.trust_remote_code,
    )
    features = render.features("messages")
    source = datasets.Dataset.from_dict(
        {"messages": rows.conversations}, features=datasets.Features({"messages": features["messages"]})
    )
    render_settings = render.settings_for(
        settings.dataset.model_copy(update={"format": "messages", "columns": {}, "system_prompt": None}),
        chat,
        train.max_seq_length,
        train.train_on_responses_only,
    )
    if len(source):
        processed = render.render_dataset(
            source, render_settings, chat.tokenizer, str(work / "replay.arrow"), f"prepare {item} replay"
        )
    else:  # datasets maps an empty dataset to one without columns
        processed = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    kept = render.kept_rows(processed)
    section = {
        "dataset": settings.dataset.path,
        "format": settings.dataset.format,
        "answered_by": str(recipe.base_model),
        "fraction": settings.fraction,
        **rows.summary(),
        "rows": len(kept),
        "rendering_rejected": dict(report.reason_counts(processed)),
    }
    section["fraction_of_train"] = len(kept) / max(1, own_rows + len(kept))
    return section, kept


def _notify(item: str, summary: dict, source: str, rejected_file: Path) -> None:
    """The rows that did not make it as they were, on the screen: the user decides whether the data needs fixing."""
    if summary["rejected"]:
        reasons = ", ".join(f"{reason} {count}" for reason, count in summary["rejected_by_reason"].items())
        console.notice(
            f"prepare {item}: {summary['rejected']} of {summary['rows_in']} rows of {source} rejected ({reasons}); "
            f"each with its reason in {rejected_file}"
        )
    if summary["deduplicated"]:
        console.notice(f"prepare {item}: {summary['deduplicated']} duplicate conversations removed")
    if summary["truncated"]:
        console.notice(f"prepare {item}: {summary['truncated']} rows truncated to max_seq_length")
    if "replay" in summary:
        console.notice(_replay_line(item, summary["replay"]))


def _replay_line(item: str, replay: dict) -> str:
    """What the screen says of a fine-tune's replay rows: how many, from where, and what was left out."""
    left_out = [
        f"{replay[key]} {what}"
        for key, what in (("unfinished", "not finished within max_new_tokens"), ("empty", "empty"))
        if replay[key]
    ]
    return (
        f"prepare {item}: {replay['rows']} replay rows ({replay['fraction_of_train']:.0%} of train): prompts of "
        f"{replay['dataset']} answered by the base {replay['answered_by']}"
        + (f" ({replay['cached']} of {replay['prompts']} answers from the cache)" if replay["cached"] else "")
        + (f"; left out: {', '.join(left_out)}" if left_out else "")
    )


def split_indices(rows: int, eval_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic held-out split for a given seed and row count: eval_size is a fraction (< 1) or a count."""
    count = int(eval_size) if eval_size >= 1 else (max(1, round(rows * eval_size)) if eval_size > 0 else 0)
    if count >= rows and count:
        raise ValueError(f"dataset.eval_size {eval_size} holds out {count} of {rows} rows, leaving none to train on")
    order = np.random.default_rng(seed).permutation(rows)
    return sorted(order[count:].tolist()), sorted(order[:count].tolist())


def _save(dataset, path: Path) -> None:
    """save_to_disk, also for an empty split (datasets writes a view of zero rows as zero shards that
    load_from_disk cannot read)."""
    if len(dataset) == 0:
        import datasets

        dataset = datasets.Dataset.from_dict({c: [] for c in dataset.column_names}, features=dataset.features)
    dataset.save_to_disk(path, num_shards=1 if len(dataset) == 0 else None)


def _first_occurrences(kept) -> list[int]:
    """Indices of the first row of each distinct conversation (exact duplicates removed, order kept)."""
    seen: set[str] = set()
    first = []
    offset = 0
    for batch in kept.select_columns(["hash"]).iter(batch_size=10_000):
        for position, digest in enumerate(batch["hash"]):
            if digest not in seen:
                seen.add(digest)
                first.append(offset + position)
        offset += len(batch["hash"])
    return first


STAGE = Stage(name="prepare", items=each_finetune, config=config, check=check, run=run)
