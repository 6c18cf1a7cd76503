"""The prepared splits as SFTTrainer takes them: pre-tokenized `input_ids` plus `assistant_masks`.

TRL 1.14.2 (and Unsloth's replacement of its dataset preparation) turn `assistant_masks` into `labels` (-100 where
the mask is 0) for a dataset that already has `input_ids`, so the trained ids are exactly the ones prepare marked
(and its label view shows). Everything else in the rows (`messages`, `text`) is dropped so neither library
re-renders or re-tokenizes anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, load_from_disk

REQUIRED_COLUMNS = ("input_ids", "assistant_masks")
CHECKED_ROWS = 200


class PreparedDataError(ValueError):
    """The prepare output does not match what training expects; the message names the file, the row, the column."""


def load_split(prepare_dir: Path, split: str, *, responses_only: bool, max_seq_length: int) -> Dataset:
    """One split with only the columns training reads: `input_ids` and, when the loss is on responses only,
    `assistant_masks`. Raises PreparedDataError for missing columns, mismatched lengths or rows too long."""
    path = Path(prepare_dir) / split
    if not path.is_dir():
        raise PreparedDataError(f"{path}: missing; the prepare stage writes train/ and eval/ with save_to_disk")
    dataset = load_from_disk(str(path))
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise PreparedDataError(f"{path}: columns {missing} missing (has {dataset.column_names})")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_length]
    if too_long:
        raise PreparedDataError(
            f"{path}: {len(too_long)} rows are longer than train.max_seq_length={max_seq_length} (first: row "
            f"{too_long[0]}, {lengths[too_long[0]]} tokens); prepare drops or truncates them with the same limit, "
            "so rerun prepare after changing max_seq_length"
        )
    columns = list(REQUIRED_COLUMNS) if responses_only else ["input_ids"]
    return dataset.select_columns(columns)


def end_of_turn_id(prepare_dir: Path, tokenizer) -> int | None:
    """The id of the end-of-turn token prepare recorded in report.json (None when it recorded none)."""
    report_file = Path(prepare_dir) / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    token = report.get("end_of_turn_token")
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise PreparedDataError(f"{report_file}: end_of_turn_token {token!r} is not a token of the base tokenizer")
    return token_id


def check_turns_end_trained(
    dataset: Dataset, eot_id: int, where: str, max_seq_length: int, rows: int = CHECKED_ROWS
) -> None:
    """Every trained span must end with the end-of-turn token, or the model never learns to stop (a row truncated
    to max_seq_length may end mid-turn). Checks the first `rows` rows: a template or masking mistake shows on every
    row, so a sample finds it cheaply."""
    for index, row in enumerate(dataset.select(range(min(rows, len(dataset))))):
        ids, mask = row["input_ids"], row["assistant_masks"]
        if len(ids) != len(mask):
            raise PreparedDataError(f"{where}: row {index}: input_ids has {len(ids)} ids, assistant_masks {len(mask)}")
        if not any(mask):
            raise PreparedDataError(f"{where}: row {index} has no trained (assistant) token")
        span_ends = [i for i, bit in enumerate(mask) if bit and (i + 1 == len(mask) or not mask[i + 1])]
        wrong = [i for i in span_ends if ids[i] != eot_id and not i + 1 == len(ids) == max_seq_length]
        if wrong:
            raise PreparedDataError(
                f"{where}: row {index}: an assistant span ends at position {wrong[0]} with id {ids[wrong[0]]}, not "
                f"the end-of-turn id {eot_id}; the model would not learn to stop"
            )
