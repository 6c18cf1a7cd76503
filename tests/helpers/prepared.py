"""Data for the prepare and train stages: the shipped example files (prepare's input, one per format), and
prepare/<finetune>/ as the stage writes it, made by its own render function (ChatML template, assistant mask on each
reply and its <|im_end|>), for tests that need prepared data without running the stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer

from pipeline.data import render
from pipeline.data.templates import TEMPLATES_DIR

EXAMPLES = {
    "alpaca": TEMPLATES_DIR / "alpaca.example.jsonl",
    "sharegpt": TEMPLATES_DIR / "sharegpt.example.json",
    "messages": TEMPLATES_DIR / "messages.example.jsonl",
    "text": TEMPLATES_DIR / "text.example.csv",
}
CHATML = render.RenderSettings(
    data_format="messages",
    template=(TEMPLATES_DIR / "chatml.jinja").read_text(),
    end_of_turn="<|im_end|>",
    max_length=1_000_000,
)
WORDS = "abcdefghij"
SKILLS = {"reverse": lambda words: words[::-1], "sort": sorted}


def chatml_row(tokenizer, messages: list[dict]) -> dict:
    rendered = render.prepare_batch({"messages": [messages]}, [0], settings=CHATML, tokenizer=tokenizer)
    assert rendered["reason"] == [None], rendered["detail"]
    return {key: rendered[key][0] for key in ("messages", "text", "input_ids", "assistant_masks")}


def conversation(rng: random.Random) -> list[dict]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "reverse\n" + " ".join(words)},
        {"role": "assistant", "content": " ".join(words[::-1])},
        {"role": "user", "content": "and sorted?"},
        {"role": "assistant", "content": " ".join(sorted(words))},
    ]


def write_prepared(out_dir, tokenizer_dir, train_rows: int = 32, eval_rows: int = 8, seed: int = 0):
    """prepare/<finetune>/ as the train stage reads it: train/ and eval/ datasets and report.json."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    rows = [chatml_row(tokenizer, conversation(rng)) for _ in range(train_rows + eval_rows)]
    Dataset.from_list(rows[:train_rows]).save_to_disk(str(out_dir / "train"))
    Dataset.from_list(rows[train_rows:]).save_to_disk(str(out_dir / "eval"))
    (out_dir / "report.json").write_text(
        json.dumps({"end_of_turn_token": "<|im_end|>", "train_rows": train_rows, "eval_rows": eval_rows})
    )
    return out_dir


def write_prepared_eval(out_dir: Path, tokenizer_dir: Path, skill: str, rows: int = 6) -> Path:
    """prepare/<finetune>/ with the eval split and report.json the evaluate stage reads: `skill` (a key of SKILLS)
    applied to a few words."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(skill)
    conversations = []
    for _ in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        conversations.append(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"{skill}\n{' '.join(words)}"},
                {"role": "assistant", "content": " ".join(SKILLS[skill](words))},
            ]
        )
    Dataset.from_list([chatml_row(tokenizer, c) for c in conversations]).save_to_disk(str(out_dir / "eval"))
    (out_dir / "report.json").write_text(json.dumps({"end_of_turn_token": "<|im_end|>"}))
    return out_dir
