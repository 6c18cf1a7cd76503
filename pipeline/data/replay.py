"""Self-distilled replay: general prompts answered greedily by the base model, mixed into a fine-tune's training rows.

A LoRA trained only on its own skill learns "whatever I am asked → my skill": applied to an instruct target it then
answers other requests with it, and summed with other LoRAs in a merge they fight over every answer. Rows whose
answers are the base's own teach it to change what its data asks for and nothing else (on those rows the LoRA has
nothing to learn but to leave the base's output as it is, so it also leaves the target's).

The prompts come from any dataset (each row's conversation up to its last user turn), drawn in a seeded order; the
base answers them in the recipe's chat template, as training renders them. Answers are cached by content, per prompt
under the base, the template and the generation settings, so a second fine-tune (or a rerun) drawing the same
prompts generates only those it has not seen.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.formats import RowRejected, to_conversation
from pipeline.data.loading import RAW_COLUMN, load_source
from pipeline.data.render import parse_json_line
from pipeline.files import write_json_atomic
from pipeline.fingerprint import hash_json, model_fingerprint

if TYPE_CHECKING:
    from pipeline.data.templates import ChatFormat
    from pipeline.recipe import DatasetConfig, ReplayConfig


@dataclass(frozen=True)
class ReplayRows:
    """The replay conversations (prompt + the base's answer) and how they came to be."""

    conversations: list[list[dict[str, str]]]
    requested: int  # prompts asked for (the fraction of the training rows)
    dataset_rows: int  # rows in the replay dataset
    prompts: int  # distinct prompts drawn and answered
    unfinished: int  # answers cut by max_new_tokens before the end of the turn: left out
    empty: int  # answers with nothing in them (the base ended the turn at once): left out
    rejected: dict[str, int] = field(default_factory=dict)  # rows that are no prompt, by reason
    duplicates: int = 0  # rows repeating a prompt already drawn
    cached: int = 0  # prompts whose answer was read from the cache

    def summary(self) -> dict:
        return {
            "rows": len(self.conversations),
            "requested": self.requested,
            "dataset_rows": self.dataset_rows,
            "prompts": self.prompts,
            "unfinished": self.unfinished,
            "empty": self.empty,
            "rejected_by_reason": self.rejected,
            "duplicates": self.duplicates,
            "cached": self.cached,
        }


def replay_count(train_rows: int, fraction: float) -> int:
    """Replay rows that make `fraction` of the training rows beside `train_rows` rows of the fine-tune's own."""
    return round(train_rows * fraction / (1 - fraction))


def sample_prompts(
    dataset: DatasetConfig, count: int, seed: int, work_dir: Path
) -> tuple[list[list[dict[str, str]]], int, Counter, int]:
    """Up to `count` distinct prompts from `dataset`'s rows in a seeded order: (prompts, rows in the dataset,
    rejected rows by reason, duplicates). Rows are read one at a time until `count` are found, so a large general
    set costs only what is drawn."""
    source = load_source(dataset, work_dir)
    if dataset.max_samples:
        source = source.select(range(min(dataset.max_samples, len(source))))
    prompts, seen, rejected, duplicates = [], set(), Counter(), 0
    for index in np.random.default_rng(seed).permutation(len(source)):
        if len(prompts) == count:
            break
        row = source[int(index)]
        try:
            if list(row) == [RAW_COLUMN]:
                row = parse_json_line(row[RAW_COLUMN])
            columns = dict(dataset.columns)
            prompt = to_conversation(row, dataset.format, columns, dataset.system_prompt, prompt_only=True)
        except RowRejected as error:
            rejected[error.reason] += 1
            continue
        key = json.dumps(prompt)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        prompts.append(prompt)
    return prompts, len(source), rejected, duplicates


def prompt_text(prompt: list[dict[str, str]], chat: ChatFormat) -> str:
    """The prompt as training renders the conversation up to its reply: the template with its generation prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, _ = render_jinja_template(
        [prompt], chat_template=chat.template, add_generation_prompt=True, **chat.template_kwargs
    )
    return texts[0]


def generation_dtype(setting: str, device: str) -> str:
    """The dtype the base answers in: `auto` is float32 on CPU (bf16 matmuls are slow there; the weights are the
    same, widened), else evaluate's choice for the GPU (bf16 where it is native, fp16 before)."""
    from pipeline.evaluation.models import evaluation_dtype
    from pipeline.merging.adapted_model import resolve_device

    where = resolve_device(device)
    if setting == "auto" and where.type == "cpu":
        return "float32"
    return str(evaluation_dtype(setting, where)).removeprefix("torch.")


def answer_prompts(
    model_dir: Path,
    prompts: list[list[dict[str, str]]],
    chat: ChatFormat,
    settings: ReplayConfig,
    *,
    trust_remote_code: bool = False,
):
    """The model's greedy reply to each prompt (a `Reply`: text, and whether the end of the turn was reached),
    generated as the replay `settings` say: in batches of prompts of similar length, on the GPU when their device is
    auto and there is one."""
    import torch

    from pipeline.evaluation.generate import greedy_replies
    from pipeline.evaluation.models import ModelSpec, load_causal_lm, release
    from pipeline.merging.adapted_model import resolve_device

    tokenizer = chat.tokenizer
    ids = [tokenizer.encode(prompt_text(prompt, chat), add_special_tokens=False) for prompt in prompts]
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(chat.end_of_turn), tokenizer.eos_token_id} - {None})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    where = resolve_device(settings.device)
    model = load_causal_lm(
        ModelSpec("base", "base", Path(model_dir)),
        dtype=generation_dtype(settings.dtype, settings.device),
        device=where,
        trust_remote_code=trust_remote_code,
        load_in_4bit=settings.load_in_4bit,
    )
    order = sorted(range(len(ids)), key=lambda index: len(ids[index]))  # less padding per batch
    try:
        with torch.no_grad():
            replies = greedy_replies(
                model,
                tokenizer,
                [ids[index] for index in order],
                stop_ids=stop_ids,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                pad_id=pad_id,
                description="replay answers",
            )
    finally:
        del model
        release(where)
    by_prompt = [None] * len(ids)
    for index, reply in zip(order, replies, strict=True):
        by_prompt[index] = reply
    return by_prompt


def replay_rows(
    model_dir: Path,
    settings: ReplayConfig,
    chat: ChatFormat,
    *,
    count: int,
    seed: int,
    work_dir: Path,
    cache_dir: Path,
    trust_remote_code: bool = False,
) -> ReplayRows:
    """`count` prompts of the replay dataset with the base's answers as conversations, ready to render like any
    messages row; answers cut short by `max_new_tokens` or empty are left out and counted. Each prompt's answer is
    read from `cache_dir` when the same base (its files, the tokenizer's included), template and settings answered it
    before: only the prompts never answered are generated."""
    from pipeline.evaluation.generate import Reply

    prompts, dataset_rows, rejected, duplicates = sample_prompts(settings.dataset, count, seed, work_dir)
    answers_key = hash_json(
        {
            "model": model_fingerprint(str(model_dir)),
            "template": chat.template,
            "template_kwargs": chat.template_kwargs,
            "end_of_turn": chat.end_of_turn,
            "max_new_tokens": settings.max_new_tokens,
            # as computed: auto is float32 on a CPU, bf16 on a GPU
            "dtype": generation_dtype(settings.dtype, settings.device),
            "load_in_4bit": settings.load_in_4bit,
        }
    )
    cache_file = Path(cache_dir) / f"{answers_key[:32]}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    keys = [hash_json(prompt) for prompt in prompts]
    missing = [index for index, key in enumerate(keys) if key not in cache]
    if missing:
        asked = [prompts[index] for index in missing]
        answered = answer_prompts(model_dir, asked, chat, settings, trust_remote_code=trust_remote_code)
        for index, reply in zip(missing, answered, strict=True):
            cache[keys[index]] = [reply.text, reply.finished]
        write_json_atomic(cache_file, cache, indent=None)  # a run killed mid-write leaves no half file
    replies = [Reply(*cache[key]) for key in keys]
    kept = [(p, r) for p, r in zip(prompts, replies, strict=True) if r.finished and r.text.strip()]
    return ReplayRows(
        conversations=[[*prompt, {"role": "assistant", "content": reply.text}] for prompt, reply in kept],
        requested=count,
        dataset_rows=dataset_rows,
        prompts=len(prompts),
        unfinished=sum(not reply.finished for reply in replies),
        empty=sum(reply.finished and not reply.text.strip() for reply in replies),
        rejected=dict(rejected.most_common()),
        duplicates=duplicates,
        cached=len(prompts) - len(missing),
    )
