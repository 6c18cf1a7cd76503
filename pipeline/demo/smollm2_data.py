"""The real-model recipe's data (recipes/smollm2_135m_cpu.yaml): three word skills in English, deterministic from a
seed, each a format SmolLM2-135M-Instruct does not follow by itself but learns in a few dozen steps.

- `hyphenate` is the target's own skill: the instruct step that makes the target from the base teaches it
  (pipeline/demo/smollm2.py), and the retention set asks for it: does the merge keep what the target knew?
- `reverse` (alpaca rows) and `numbered` (messages rows) are the two fine-tunes, LoRAs trained on the base.

A list of words belongs to the training half or the held-out half by a hash of its words, so the retention set never
holds a list the target's instruct step saw.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

NOUNS = """apple river stone cloud garden window bottle candle forest pencil mirror basket rabbit island bridge
ladder castle spoon blanket jacket planet rocket violin camera wallet kettle carpet pillow lemon tiger dolphin eagle
turtle engine button hammer needle anchor barrel cabbage carrot cherry coffee cookie copper desert dragon feather
flower glove guitar harbor helmet honey insect jungle kitten lantern letter magnet marble meadow melon monkey noodle
orange oyster palace parrot peanut pepper pirate pocket potato puzzle rainbow saddle sailor salad shadow shovel silver
singer spider sugar summer sunset table teacher ticket tomato tunnel valley wagon walnut winter wizard yogurt zebra
"""
WORDS = sorted(set(NOUNS.split()))
SKILLS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "hyphenate": ("Join these words with hyphens: {words}", lambda words: "-".join(words)),
    "reverse": ("Reverse the order of these words: {words}", lambda words: " ".join(reversed(words))),
    "numbered": (
        "Write these words as a numbered list: {words}",
        lambda words: "\n".join(f"{index}. {word}" for index, word in enumerate(words, 1)),
    ),
}


def is_held_out(words: list[str]) -> bool:
    """One list in four is kept for testing, whatever the seed or the skill."""
    return hashlib.sha1(" ".join(words).encode()).digest()[0] % 4 == 0


def random_words(rng: random.Random, *, held_out: bool = False, low: int = 3, high: int = 4) -> list[str]:
    while True:
        words = rng.sample(WORDS, rng.randint(low, high))
        if is_held_out(words) == held_out:
            return words


def skill_messages(skill: str, rng: random.Random, *, held_out: bool = False) -> list[dict[str, str]]:
    """One chat: the skill's request on a fresh list, and its answer."""
    request, answer = SKILLS[skill]
    words = random_words(rng, held_out=held_out)
    return [
        {"role": "user", "content": request.format(words=" ".join(words))},
        {"role": "assistant", "content": answer(words)},
    ]


def alpaca_row(messages: list[dict[str, str]]) -> dict[str, str]:
    instruction, _, words = messages[0]["content"].partition(": ")
    return {"instruction": instruction + ".", "input": words, "output": messages[1]["content"]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# file name → (skill, format, rows, held out, seed)
DATA_FILES = {
    "reverse.alpaca.jsonl": ("reverse", "alpaca", 400, False, 11),
    "numbered.messages.jsonl": ("numbered", "messages", 400, False, 12),
    "hyphenate.messages.jsonl": ("hyphenate", "messages", 48, True, 13),  # the retention set: held-out lists
}


def write_data(directory: Path) -> dict[str, Path]:
    """The recipe's fine-tune sets and retention set in `directory`, by file name."""
    written = {}
    for name, (skill, data_format, rows, held_out, seed) in DATA_FILES.items():
        rng = random.Random(seed)
        chats = [skill_messages(skill, rng, held_out=held_out) for _ in range(rows)]
        records = [alpaca_row(c) for c in chats] if data_format == "alpaca" else [{"messages": c} for c in chats]
        written[name] = write_rows(Path(directory) / name, records)
    return written
