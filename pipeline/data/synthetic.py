"""The demo's synthetic language and its skills, generated deterministically from a seed.

"Words" are the letters a-j. Plain documents are phrases of words, some repeated later in the same document (so a
model pretrained on them learns to look back and copy, as real pretraining teaches in-context copying). A skill maps
a list of words to an answer: copy (the target model's skill), reverse and sort (the demo's two fine-tunes).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

WORDS = list("abcdefghij")
SKILLS = {"copy": lambda words: words, "reverse": lambda words: words[::-1], "sort": sorted}
DEMO_DATA_DIR = Path(__file__).resolve().parents[2] / "data_templates" / "demo"
# file name → (skill, format, rows, seed); the seeds differ so the sets do not share prompts by construction.
DEMO_DATASETS = {
    "reverse.alpaca.jsonl": ("reverse", "alpaca", 400, 11),
    "sort.messages.jsonl": ("sort", "messages", 400, 12),
    "copy.messages.jsonl": ("copy", "messages", 100, 13),
}


def random_words(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def skill_example(skill: str, rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, answer) of one example, e.g. ("sort", "c a b", "a b c")."""
    words = random_words(rng)
    return skill, " ".join(words), " ".join(SKILLS[skill](words))


def skill_messages(skill: str, rng: random.Random) -> list[dict[str, str]]:
    """One example as a conversation; the user turn is "instruction\\ninput", as the alpaca format renders it."""
    instruction, text, answer = skill_example(skill, rng)
    return [{"role": "user", "content": f"{instruction}\n{text}"}, {"role": "assistant", "content": answer}]


def plain_document(rng: random.Random) -> str:
    phrases: list[str] = []
    for _ in range(rng.randint(3, 6)):
        if phrases and rng.random() < 0.6:
            phrases.append(rng.choice(phrases))
        else:
            phrases.append(" ".join(random_words(rng, 2, 6)))
    return " . ".join(phrases) + " ."


def tokenizer_corpus(rng: random.Random, size: int = 2000) -> Iterator[str]:
    """Text the demo BPE is trained on: the language, the skills' prompts and the chat roles."""
    for index in range(size):
        if index % 10 == 0:
            yield "system\nuser\nassistant\nYou are a helpful assistant.\ncopy\nreverse\nsort\n"
        else:
            yield plain_document(rng)


def demo_rows(skill: str, data_format: str, rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if data_format == "alpaca":
        fields = ("instruction", "input", "output")
        return [dict(zip(fields, skill_example(skill, rng), strict=True)) for _ in range(rows)]
    return [{"messages": skill_messages(skill, rng)} for _ in range(rows)]


def write_demo_datasets(directory: Path = DEMO_DATA_DIR) -> list[Path]:
    """Write the demo's datasets (committed under data_templates/demo/; a test checks they match this function)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (skill, data_format, rows, seed) in DEMO_DATASETS.items():
        path = directory / name
        lines = (json.dumps(row) for row in demo_rows(skill, data_format, rows, seed))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written
