"""One batch of source rows → conversations → rendered text → base-tokenizer ids and the assistant mask.

Runs inside `datasets.map(batched=True)`, so nothing here holds more than one batch. The mask marks every token
of each assistant reply and its end-of-turn token: from the template's {% generation %} spans when it has them,
otherwise from rendering the conversation up to each reply with the generation prompt (the reply is what follows
that prefix in the full rendering, up to and including the first end-of-turn token). Characters map to tokens
through the Rust tokenizer's encodings (char_to_token, offsets).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import datasets
from transformers.utils.chat_template_utils import render_jinja_template

from pipeline.data.formats import RowRejected, to_conversation, to_text
from pipeline.data.loading import RAW_COLUMN

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
FEATURES = {
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "text": datasets.Value("string"),
    "input_ids": datasets.List(datasets.Value("int32")),
    "assistant_masks": datasets.List(datasets.Value("int8")),
    "length": datasets.Value("int32"),
    "reason": datasets.Value("string"),
    "detail": datasets.Value("string"),
    "source": datasets.Value("string"),
    "row": datasets.Value("int64"),
    "hash": datasets.Value("string"),
}
HELPER_COLUMNS = ["length", "reason", "detail", "source", "row", "hash"]


class TemplateError(ValueError):
    """A template that cannot give assistant spans for a conversation (not a growing prefix, no end-of-turn)."""


@dataclass(frozen=True)
class RenderSettings:
    data_format: str
    template: str
    end_of_turn: str
    max_length: int
    overlength: str = "drop"
    train_on_responses_only: bool = True
    columns: dict = field(default_factory=dict)
    system_prompt: str | None = None
    template_kwargs: dict = field(default_factory=dict)


def features(data_format: str) -> datasets.Features:
    return datasets.Features({k: v for k, v in FEATURES.items() if not (k == "messages" and data_format == "text")})


def render(messages: list[dict], settings: RenderSettings) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies (with end-of-turn token)."""

    def rendered(turns: list[dict], prompt: bool = False, spans: bool = False):
        texts, indices = render_jinja_template(
            [turns],
            chat_template=settings.template,
            add_generation_prompt=prompt,
            return_assistant_tokens_mask=spans,
            **settings.template_kwargs,
        )
        return texts[0], (indices[0] if spans else None)

    if GENERATION_TAG.search(settings.template):
        return rendered(messages, spans=True)
    text, _ = rendered(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, _ = rendered(messages[:index], prompt=True)
        end = text.find(settings.end_of_turn, len(prompt))
        if not text.startswith(prompt) or end < 0:
            raise TemplateError(
                "the chat template does not render a conversation as a growing prefix ending each "
                f"reply with {settings.end_of_turn!r}; add {{% generation %}} markers to it"
            )
        spans.append((len(prompt), end + len(settings.end_of_turn)))
    return text, spans


def token_mask(encoding, spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap an assistant span, from a `tokenizers.Encoding`."""
    mask = [0] * len(encoding.ids)
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:  # characters no token covers (a normalizer dropped them): use offsets
            for index, (token_start, token_end) in enumerate(encoding.offsets):
                if token_start < end and token_end > start:
                    mask[index] = 1
            continue
        mask[first : last + 1] = [1] * (last + 1 - first)
    return mask


def prepare_batch(batch: dict[str, list], indices: list[int], *, settings: RenderSettings, tokenizer) -> dict:
    """The `datasets.map` function: every row gets all FEATURES columns; rejected rows have a `reason`."""
    keys = list(batch)
    out: dict[str, list] = {name: [] for name in FEATURES}
    pending: list[int] = []
    spans_of: list[list[tuple[int, int]]] = []
    for position, values in enumerate(zip(*batch.values(), strict=True)):
        row = dict(zip(keys, values, strict=True))
        raw = row.get(RAW_COLUMN) if keys == [RAW_COLUMN] else None
        out["row"].append(indices[position])
        try:
            if raw is not None:
                row = parse_json_line(raw)
            if settings.data_format == "text":
                messages, text = [], to_text(row, settings.columns)
                spans = [(0, len(text))]
            else:
                messages = to_conversation(row, settings.data_format, settings.columns, settings.system_prompt)
                text, spans = render(messages, settings)
            reason = detail = None
            pending.append(position)
            spans_of.append(spans)
        except RowRejected as rejected:
            messages, text, reason, detail = [], "", rejected.reason, rejected.detail
        except TemplateError:
            raise
        except Exception as error:  # a template's raise_exception or a jinja error on this row's content
            messages, text, reason, detail = [], "", "template_error", f"{type(error).__name__}: {error}"
        out["messages"].append(messages)
        out["text"].append(text)
        out["reason"].append(reason)
        out["detail"].append(detail)
        out["source"].append(None if reason is None else (raw if raw is not None else json.dumps(row, default=str)))
        out["hash"].append(hashlib.sha1(json.dumps(messages or text).encode()).hexdigest() if reason is None else None)
    out["input_ids"] = [[] for _ in out["row"]]
    out["assistant_masks"] = [[] for _ in out["row"]]
    out["length"] = [0 for _ in out["row"]]
    if pending:
        # the Rust tokenizer directly: its encodings map characters to tokens (what transformers' __call__ runs)
        encodings = tokenizer.backend_tokenizer.encode_batch(
            [out["text"][p] for p in pending], add_special_tokens=False
        )
        for position, encoding, spans in zip(pending, encodings, spans_of, strict=True):
            ids = encoding.ids
            mask = token_mask(encoding, spans) if settings.train_on_responses_only else [1] * len(ids)
            _store(out, position, ids, mask, settings)
    if settings.data_format == "text":
        del out["messages"]
    return out


def _store(out: dict, position: int, ids: list[int], mask: list[int], settings: RenderSettings) -> None:
    """Keep the row's ids and mask, or reject/truncate it when it is longer than the fine-tune's max_seq_length."""
    out["length"][position] = len(ids)
    if len(ids) > settings.max_length:
        if settings.overlength == "drop" or not any(mask[: settings.max_length]):
            why = "" if settings.overlength == "drop" else "; truncating would leave no trained token"
            out["reason"][position] = "overlength"
            out["detail"][position] = f"{len(ids)} tokens > train.max_seq_length {settings.max_length}{why}"
            out["source"][position] = out["text"][position]
            out["hash"][position] = None
            return
        out["detail"][position] = f"truncated from {len(ids)} tokens"
        ids, mask = ids[: settings.max_length], mask[: settings.max_length]
        out["length"][position] = len(ids)
    out["input_ids"][position] = ids
    out["assistant_masks"][position] = mask


def parse_json_line(raw: str) -> dict:
    try:
        row = json.loads(raw)
    except ValueError as error:
        raise RowRejected("invalid_json", f"not a JSON object: {error}") from None
    if not isinstance(row, dict):
        raise RowRejected("invalid_json", f"a JSON {type(row).__name__}, not an object")
    return row


def settings_for(dataset, chat, max_length: int, train_on_responses_only: bool = True) -> RenderSettings:
    """How one dataset block (a fine-tune's or a retention set's `dataset:`) is rendered with a chat format."""
    return RenderSettings(
        data_format=dataset.format,
        template=chat.template,
        end_of_turn=chat.end_of_turn,
        max_length=max_length,
        overlength=dataset.overlength,
        train_on_responses_only=train_on_responses_only,
        columns=dict(dataset.columns),
        system_prompt=dataset.system_prompt,
        template_kwargs=chat.template_kwargs,
    )


def render_dataset(
    source: datasets.Dataset,
    settings: RenderSettings,
    tokenizer,
    cache_file: str,
    desc: str,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Every source row with all FEATURES columns: one code path for prepare's fine-tunes and evaluate's retention
    sets, so a retention set is tokenized exactly as training data is."""
    return source.map(
        prepare_batch,
        batched=True,
        batch_size=500,
        with_indices=True,
        remove_columns=source.column_names,
        features=features(settings.data_format),
        fn_kwargs={"settings": settings, "tokenizer": tokenizer},
        num_proc=num_proc,
        cache_file_name=cache_file,
        desc=desc,
    )


def kept_rows(processed: datasets.Dataset) -> datasets.Dataset:
    return processed.filter(_is_kept, input_columns="reason", batched=True, batch_size=10_000)


def rejected_rows(processed: datasets.Dataset) -> datasets.Dataset:
    return processed.filter(_is_rejected, input_columns="reason", batched=True, batch_size=10_000)


def _is_kept(reasons: list) -> list[bool]:
    return [reason is None for reason in reasons]


def _is_rejected(reasons: list) -> list[bool]:
    return [reason is not None for reason in reasons]
