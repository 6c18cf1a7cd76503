"""The real-model recipe's data (recipes/smollm2_135m_cpu.yaml): three word skills in English, deterministic from a
seed, each a format SmolLM2-135M-Instruct does not follow by itself but learns in a few dozen steps.

- `hyphenate` is the target's own skill: the instruct step that makes the target from the base teaches it
  (pipeline/demo/smollm2.py), and the retention set asks for it: does the merge keep what the target knew?
- `reverse` (alpaca rows) and `numbered` (messages rows) are the two fine-tunes, LoRAs trained on the base.

Each training set also mixes in self-distilled replay, as real instruct data mixes in general requests: requests of
word operations no skill names (`REPLAY_REQUESTS`), answered by the base itself (`replay.messages.jsonl`). Without
them each model learned "a list of words → my operation" (measured on the first full run, 16 held-out rows each): the
target hyphenated numbered and reverse requests, the reverse LoRA reversed hyphenate requests (the target + it: 0 %
on hyphenate), and the merge kept none of hyphenate (0 % against the target's 62 %).

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


# Operations no skill names, asked of the base, whose own answers are replayed (so a tune changes what it is asked for,
# and nothing else).
REPLAY_REQUESTS = (
    "Write the first word of this list: {words}",
    "Write the last word of this list: {words}",
    "Write these words in capital letters: {words}",
    "How many words are in this list: {words}",
    "Sort these words alphabetically: {words}",
    "Which of these words is the longest: {words}",
    "Use these words in one sentence: {words}",
    "Separate these words with commas: {words}",
)
REPLAY_COUNT = 160
REPLAY_SEED = 21


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


def replay_requests() -> list[list[dict[str, str]]]:
    """REPLAY_COUNT requests of the replayed operations on training-half lists, deterministic."""
    rng = random.Random(REPLAY_SEED)
    return [
        [{"role": "user", "content": rng.choice(REPLAY_REQUESTS).format(words=" ".join(random_words(rng)))}]
        for _ in range(REPLAY_COUNT)
    ]


def read_replay(directory: Path) -> list[list[dict[str, str]]]:
    """The replayed chats (request and the base's answer) written by `write_data`."""
    lines = (Path(directory) / REPLAY_FILE).read_text().splitlines()
    return [json.loads(line)["messages"] for line in lines]


REPLAY_FILE = "replay.messages.jsonl"
# file name → (skill, format, skill rows, replayed rows, held out, seed)
DATA_FILES = {
    "reverse.alpaca.jsonl": ("reverse", "alpaca", 240, True, False, 11),
    "numbered.messages.jsonl": ("numbered", "messages", 240, True, False, 12),
    "hyphenate.messages.jsonl": ("hyphenate", "messages", 48, False, True, 13),  # the retention set: held-out lists
}


def write_data(directory: Path, answer: Callable[[list[list[dict[str, str]]]], list[str | None]]) -> dict[str, Path]:
    """The recipe's fine-tune sets and retention set in `directory`, by file name, and the replayed chats:
    `answer(requests)` is the base's reply to each request (None: it did not finish one, and the request is left
    out). Each fine-tune set is its skill's rows and every replayed chat, shuffled."""
    directory = Path(directory)
    requests = replay_requests()
    replayed = [
        [*request, {"role": "assistant", "content": reply}]
        for request, reply in zip(requests, answer(requests), strict=True)
        if reply
    ]
    written = {REPLAY_FILE: write_rows(directory / REPLAY_FILE, [{"messages": chat} for chat in replayed])}
    for name, (skill, data_format, rows, replay, held_out, seed) in DATA_FILES.items():
        rng = random.Random(seed)
        chats = [skill_messages(skill, rng, held_out=held_out) for _ in range(rows)]
        if replay:
            chats += replayed
            rng.shuffle(chats)
        records = [alpaca_row(c) for c in chats] if data_format == "alpaca" else [{"messages": c} for c in chats]
        written[name] = write_rows(directory / name, records)
    return written
