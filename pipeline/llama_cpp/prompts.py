"""The chat prompts a GGUF file is checked on: requests from the recipe's own data (each fine-tune's held-out split,
then the retention sets), else a few general ones, rendered with the merged model's chat template (the target's,
which the GGUF file carries) up to the assistant's turn."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import chain, zip_longest
from pathlib import Path

from pipeline.data.formats import RowRejected, to_conversation
from pipeline.data.loading import RAW_COLUMN, load_source

GENERAL_REQUESTS = (
    "What is the capital of France? Answer in one word.",
    "Name three primary colours.",
    "Write one short sentence about the sea.",
    "What is 12 plus 30?",
    "Give a synonym for 'happy'.",
    "Translate 'thank you' into Spanish.",
)
Conversation = list[dict[str, str]]
MAX_PROMPT_TOKENS = 512  # a request longer than this is passed over: the check is about the model, not long contexts


def request(messages: Conversation) -> Conversation | None:
    """A conversation up to its last assistant reply (the request a model answers), None when it has none."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return [dict(m) for m in messages[:last]] if last else None


def held_out_requests(prepare_dir: Path) -> Iterator[Conversation]:
    """The requests of a fine-tune's held-out split as prepare wrote it (none for format `text`)."""
    from datasets import load_from_disk

    path = Path(prepare_dir) / "eval"
    if not path.is_dir():
        return
    split = load_from_disk(str(path))
    if "messages" not in split.column_names:
        return
    for messages in split["messages"]:
        if found := request(messages):
            yield found


def dataset_requests(dataset, work_dir: Path) -> Iterator[Conversation]:
    """The requests of a dataset block's rows (a retention set), rows that do not convert left out."""
    if dataset.format == "text":
        return
    for row in load_source(dataset, work_dir):
        try:
            if set(row) == {RAW_COLUMN}:
                row = json.loads(row[RAW_COLUMN])
            messages = to_conversation(row, dataset.format, dict(dataset.columns), dataset.system_prompt)
        except (RowRejected, ValueError, TypeError, AttributeError):
            continue
        if found := request(messages):
            yield found


def interleave(sources: Iterable[Iterable[Conversation]]) -> Iterator[Conversation]:
    """One request from each source in turn, so that every fine-tune is asked something."""
    missing = object()
    for conversation in chain.from_iterable(zip_longest(*sources, fillvalue=missing)):
        if conversation is not missing:
            yield conversation


def render_prompts(tokenizer, conversations: list[Conversation]) -> list[str]:
    """Each request as the text a chat application sends: the tokenizer's chat template with the generation prompt
    (the request's last user message as is when the tokenizer has no template)."""
    if not tokenizer.chat_template:
        return [next(m["content"] for m in reversed(c) if m["role"] == "user") for c in conversations]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]


def last_request(conversation: Conversation) -> str:
    """The user's last message: how a prompt is named on the screen."""
    return next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")


def choose_requests(
    tokenizer,
    held_out: dict[str, Path],
    retention: dict[str, object],
    work_dir: Path,
    count: int,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
) -> list[tuple[str, Conversation]]:
    """`count` (source, request) pairs whose prompts are at most `max_prompt_tokens` long: one from each fine-tune's
    held-out split (`held_out`: name → prepare's output) in turn, then from the retention sets (name → dataset
    block), then GENERAL_REQUESTS."""

    def labelled(source: str, conversations: Iterable[Conversation]):
        return ((source, conversation) for conversation in conversations)

    candidates = chain(
        interleave(labelled(f"held-out {name}", held_out_requests(path)) for name, path in held_out.items()),
        interleave(
            labelled(f"retention {name}", dataset_requests(dataset, Path(work_dir) / name))
            for name, dataset in retention.items()
        ),
        labelled("general", ([{"role": "user", "content": text}] for text in GENERAL_REQUESTS)),
    )
    chosen: list[tuple[str, Conversation]] = []
    for source, conversation in candidates:
        if len(chosen) == count:
            break
        prompt = render_prompts(tokenizer, [conversation])[0]
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            chosen.append((source, conversation))
    return chosen
