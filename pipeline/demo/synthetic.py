"""The demo's synthetic language and its skills, generated deterministically from a seed.

"Words" are single letters of three domains (a-j, A-J, k-t); a list is 3-6 distinct words of one domain (distinct,
so every skill is a lookup a small transformer learns fast: copy finds the last answer word in the list and outputs
the one after it, reverse the one before it, sort the next larger one). A skill maps a list to an answer: copy (the
target model's skill, on a-j), reverse (on A-J) and sort (on k-t), the demo's two fine-tunes, each on a domain of its
own as real fine-tunes bring one (code, law, ...); and the everyday skills (first, last, ...) of general chat.
Without the domains, two LoRAs that each learned "answer a list with my operation" cancel out when summed.

Like a real base, the base model knows more than it is asked for by name: its pretraining writes copy, reverse and
sort in a notation of their own (documents `c a b ~` / `b a c`, and chats whose instruction is the symbol `~`, on
any domain), but never under the words "copy", "reverse" or "sort". Instruct tuning and fine-tuning then mostly tie a
new instruction word to an operation the base knows, as they mostly elicit what a real base learned in pretraining.
Each fine-tune set is its skill only; the recipe mixes general prompts into its training rows through the replay
feature (`finetunes[].replay`), answered by the base itself (self-distilled replay): chats the base knows
(`known_request`) and requests of instruction words that name no skill (`unnamed_request`). Without them a LoRA learns
"an instruction I do not know → my operation", so each LoRA also runs its operation on the other fine-tune's
instruction word, and summed they fight over every answer.

Every list belongs to one of two halves by a hash of its letters: training data (pretraining, the target's tune, the
fine-tune sets) draws from one, `fresh_examples` and the retention set from the other, so a test set is never seen.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

WORDS = list("abcdefghij")
# Each demo skill works on words of its own kind, as real fine-tunes each bring a domain of their own (code, law, ...)
# beside the target's general chat: the target's copy and the everyday chats on a-j, reverse on A-J, sort on k-t.
DOMAINS = {"copy": WORDS, "reverse": list("ABCDEFGHIJ"), "sort": list("klmnopqrst")}
SKILLS = {"copy": lambda words: words, "reverse": lambda words: words[::-1], "sort": sorted}
# The base's pretraining writes the demo skills in this notation (a symbol, not the chat's instruction word).
NOTATION = {"copy": "=", "reverse": "~", "sort": "^"}
# What the base already does in chat (pretraining) and the target keeps doing (its instruct tune replays them).
EVERYDAY_SKILLS = {
    "first": lambda words: words[:1],
    "last": lambda words: words[-1:],
    "second": lambda words: words[1:2],
    "ends": lambda words: [words[0], words[-1]],
    "drop": lambda words: words[1:],
    "pop": lambda words: words[:-1],
}
ALL_SKILLS = SKILLS | EVERYDAY_SKILLS
# Letters of the language that no domain uses and no skill is named by: the base never saw them. A real general set
# asks for thousands of things a fine-tune does not name; these words stand for them.
UNNAMED_WORDS = list("uvwxyzKLMNOPQRSTUVWXYZ")
DEMO_DATA_DIR = Path(__file__).resolve().parents[2] / "data_templates" / "demo"
# The retention set, committed under data_templates/demo/ with the fine-tune sets: drawn like `fresh_examples`.
RETENTION_SET = ("copy.messages.jsonl", "copy", "messages", 100, 13)
# file name → (skill, format, rows, seed): each fine-tune's own data, its skill only, as a user brings it.
FINETUNE_SETS = {
    "reverse.alpaca.jsonl": ("reverse", "alpaca", 800, 11),
    "sort.messages.jsonl": ("sort", "messages", 800, 12),
}
# The general prompts the fine-tunes' self-distilled replay draws from (recipes/tiny_cpu.yaml: `finetunes[].replay`,
# answered by the base through the replay feature): (file name, rows, seed, share of chats the base knows).
# One in three asks for what the base knows (an everyday skill, or an operation by its symbol); the others are
# requests whose instruction is a word no skill is named by. Measured with a PEFT loop (100 fresh examples, v6
# lineage): with 5 skill rows to 3 known chats and no unnamed ones, T + w·(Δreverse + Δsort) for w 0.8-1.0 kept copy
# at 0.59-0.72 and did sort at 0.60-0.65 (T + 1.1·Δreverse reversed 85 % of sort's requests); with 2 skill rows to 1
# known and 2 unnamed (this file at replay fraction 0.6), at w 0.9: copy 0.94, reverse 0.99, sort 0.92.
GENERAL_PROMPTS = ("general.messages.jsonl", 3000, 14, 1 / 3)


def any_domain(rng: random.Random) -> list[str]:
    """The words of one domain, drawn evenly: the base's pretraining writes every operation on every domain."""
    return rng.choice(list(DOMAINS.values()))


def is_held_out(words: list[str]) -> bool:
    """One list in four is kept for testing, whatever the seed or the skill."""
    return hashlib.sha1(" ".join(words).encode()).digest()[0] % 4 == 0


def random_words(
    rng: random.Random, *, held_out: bool = False, vocabulary: list[str] = WORDS, low: int = 3, high: int = 6
) -> list[str]:
    while True:
        words = rng.sample(vocabulary, rng.randint(low, high))
        if is_held_out(words) == held_out:
            return words


def skill_example(
    skill: str, rng: random.Random, *, held_out: bool = False, vocabulary: list[str] | None = None
) -> tuple[str, str, str]:
    """(instruction, input, answer) of one example, e.g. ("sort", "m k l", "k l m"), on the skill's own domain
    unless `vocabulary` says otherwise."""
    words = random_words(rng, held_out=held_out, vocabulary=vocabulary or DOMAINS.get(skill, WORDS))
    return skill, " ".join(words), " ".join(ALL_SKILLS[skill](words))


def skill_messages(
    skill: str,
    rng: random.Random,
    *,
    held_out: bool = False,
    instruction: str | None = None,
    vocabulary: list[str] | None = None,
) -> list[dict[str, str]]:
    """One example as a conversation; the user turn is "instruction\\ninput", as the alpaca format renders it."""
    name, text, answer = skill_example(skill, rng, held_out=held_out, vocabulary=vocabulary)
    return [{"role": "user", "content": f"{instruction or name}\n{text}"}, {"role": "assistant", "content": answer}]


def pretraining_chat(rng: random.Random) -> list[dict[str, str]]:
    """A chat of the base's pretraining: an everyday skill, or a demo skill asked for by its notation symbol (the
    base can reverse when asked `~`, but has never seen the word "reverse" ask for anything)."""
    skill = rng.choice([*EVERYDAY_SKILLS, *NOTATION])
    # any skill on any domain: a domain never tells the operation
    return skill_messages(skill, rng, instruction=NOTATION.get(skill), vocabulary=any_domain(rng))


def fresh_examples(skill: str, n: int, seed: int) -> list[list[dict[str, str]]]:
    """`n` conversations of `skill` on held-out lists, which no training data of the demo contains."""
    rng = random.Random(f"fresh-{skill}-{seed}")
    return [skill_messages(skill, rng, held_out=True) for _ in range(n)]


def plain_document(rng: random.Random) -> str:
    """Phrases of words, some repeated later in the same document (pretraining teaches in-context copying)."""
    phrases: list[str] = []
    for _ in range(rng.randint(3, 6)):
        if phrases and rng.random() < 0.6:
            phrases.append(rng.choice(phrases))
        else:
            phrases.append(" ".join(rng.choices(any_domain(rng), k=rng.randint(2, 6))))
    return " . ".join(phrases) + " ."


def notation_document(rng: random.Random, lines: int = 3) -> str:
    """Lines like `c a b ~` then `b a c`: the demo skills as the base's pretraining knows them, the answer on a line
    of its own as in a chat."""
    out = []
    for _ in range(lines):
        skill = rng.choice(list(NOTATION))
        words = random_words(rng, vocabulary=any_domain(rng))
        out.append(f"{' '.join(words)} {NOTATION[skill]}\n{' '.join(SKILLS[skill](words))}")
    return "\n".join(out)


def word_corpus(rng: random.Random, size: int = 300) -> Iterator[str]:
    """Text a tokenizer learns every word of the demo from: chats of every skill (without the special tokens) and
    the pretraining documents."""
    for _ in range(size):
        messages = skill_messages(rng.choice(list(ALL_SKILLS)), rng)
        yield (
            "system\nYou are a helpful assistant.\nuser\n"
            + messages[0]["content"]
            + "\nassistant\n"
            + messages[1]["content"]
        )
        yield notation_document(rng)
        yield plain_document(rng)


def tokenizer_corpus(rng: random.Random, size: int = 2000) -> Iterator[str]:
    """Text a BPE for the language is trained on: the language, the skills' prompts and the chat roles."""
    names = "".join(f"{name}\n" for name in ALL_SKILLS)
    for index in range(size):
        if index % 10 == 0:
            yield "system\nuser\nassistant\nYou are a helpful assistant.\n" + names
        else:
            yield plain_document(rng)


def known_request(rng: random.Random) -> list[dict[str, str]]:
    """A user turn of the kind the base was pretrained on: an everyday skill, or a demo operation asked for by its
    symbol. Answered by the base, it teaches a LoRA to leave the instructions the base knows as the base answers
    them (without it, a LoRA answers every chat with its skill, and the adapted model forgets the target's copy)."""
    if rng.random() < 0.5:
        return skill_messages(rng.choice(list(EVERYDAY_SKILLS)), rng)[:1]
    skill = rng.choice(list(NOTATION))
    return skill_messages(skill, rng, instruction=NOTATION[skill])[:1]


def unnamed_request(rng: random.Random) -> list[dict[str, str]]:
    """A user turn whose instruction is a word no skill is named by (`UNNAMED_WORDS`), on a list of any domain.
    Answered by the base, it teaches a LoRA that an instruction it does not know is not a request for its skill."""
    words = random_words(rng, vocabulary=any_domain(rng))
    return [{"role": "user", "content": f"{rng.choice(UNNAMED_WORDS)}\n{' '.join(words)}"}]


def general_prompts(rows: int, seed: int, known: float) -> list[dict]:
    """`rows` general prompts (messages rows of one user turn), a `known` share of them `known_request`s and the
    others `unnamed_request`s: the replay dataset of the demo's fine-tunes."""
    rng = random.Random(seed)
    return [{"messages": known_request(rng) if rng.random() < known else unnamed_request(rng)} for _ in range(rows)]


def demo_rows(skill: str, data_format: str, rows: int, seed: int, *, held_out: bool = False) -> list[dict]:
    """`rows` examples of `skill` in `data_format` (alpaca or messages)."""
    rng = random.Random(seed)
    conversations = [skill_messages(skill, rng, held_out=held_out) for _ in range(rows)]
    if data_format == "alpaca":
        return [
            dict(zip(("instruction", "input"), user["content"].split("\n", 1), strict=True), output=reply["content"])
            for user, reply in conversations
        ]
    return [{"messages": conversation} for conversation in conversations]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_demo_sets(directory: Path = DEMO_DATA_DIR) -> list[Path]:
    """Write the demo's data (committed under data_templates/demo/; a test checks it matches): the fine-tune sets,
    the general prompts their replay draws from, and the retention set."""
    written = [
        write_rows(directory / name, demo_rows(skill, data_format, rows, seed))
        for name, (skill, data_format, rows, seed) in FINETUNE_SETS.items()
    ]
    name, rows, seed, known = GENERAL_PROMPTS
    written.append(write_rows(directory / name, general_prompts(rows, seed, known)))
    name, skill, data_format, rows, seed = RETENTION_SET
    written.append(write_rows(directory / name, demo_rows(skill, data_format, rows, seed, held_out=True)))
    return written
