"""Rows per second of the prepare stage (validation, rendering, masks, dedup, split, save) against a plain
`datasets.map(tokenizer.apply_chat_template)` on the same synthetic alpaca rows.

    python bench/prepare.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "merging",
    "adapters",
    "into",
    "an",
    "instruct",
    "target",
    "without",
    "forgetting",
    "what",
    "it",
    "knew",
    "before",
    "while",
    "each",
    "fine",
    "tune",
    "adds",
    "one",
    "skill",
]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def write_rows(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            row = {
                "instruction": sentence(rng, 5, 30),
                "input": sentence(rng, 0, 40) if rng.random() < 0.4 else "",
                "output": sentence(rng, 10, 120),
            }
            handle.write(json.dumps(row) + "\n")


def baseline(path: Path, tokenizer, num_proc: int | None) -> float:
    import datasets

    started = time.perf_counter()
    source = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=tempfile.mkdtemp(prefix="bench-baseline-")
    )

    def tokenize(batch):
        conversations = [
            [{"role": "user", "content": f"{i}\n{x}" if x else i}, {"role": "assistant", "content": o}]
            for i, x, o in zip(batch["instruction"], batch["input"], batch["output"], strict=True)
        ]
        return {"input_ids": tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False)}

    source.map(tokenize, batched=True, batch_size=500, remove_columns=source.column_names, num_proc=num_proc)
    return time.perf_counter() - started


def stage(path: Path, models: dict[str, Path], work: Path) -> float:
    from pipeline.recipe import Recipe
    from pipeline.stages import Inputs, prepare

    recipe = Recipe.model_validate(
        {
            "name": "bench",
            "output_dir": str(work / "run"),
            "base_model": str(models["base"]),
            "target_model": str(models["target"]),
            "train": {"max_seq_length": 4096},
            "finetunes": [{"name": "bench", "dataset": {"path": str(path), "format": "alpaca", "eval_size": 0.01}}],
        }
    )
    out = work / "out"
    out.mkdir()
    started = time.perf_counter()
    prepare.run(recipe, "bench", out, Inputs())
    return time.perf_counter() - started


def main() -> None:
    from transformers import AutoTokenizer

    from pipeline.demo.tiny import build_tokenizer, make_tiny_model
    from pipeline.stages.prepare import PARALLEL_FROM_ROWS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    rows = parser.parse_args().rows
    work = Path(tempfile.mkdtemp(prefix="ftmerge-bench-prepare-"))
    build_tokenizer(work / "tokenizer")
    build_tokenizer(work / "target_tokenizer", eos_token="<|im_end|>")
    models = {
        "base": make_tiny_model(work / "base", work / "tokenizer"),
        "target": make_tiny_model(work / "target", work / "target_tokenizer"),
    }
    path = work / "alpaca.jsonl"
    write_rows(path, rows)
    tokenizer = AutoTokenizer.from_pretrained(models["target"])
    num_proc = os.cpu_count() if rows >= PARALLEL_FROM_ROWS else None
    baseline_seconds = baseline(path, tokenizer, num_proc)
    stage_seconds = stage(path, models, work)
    print(f"{rows} alpaca rows, num_proc={num_proc}")
    print(
        f"baseline datasets.map(apply_chat_template): {rows / baseline_seconds:,.0f} rows/s ({baseline_seconds:.1f}s)"
    )
    print(
        f"prepare stage (validate, render, mask, dedup, split, save): {rows / stage_seconds:,.0f} rows/s "
        f"({stage_seconds:.1f}s)"
    )
    print(f"ratio stage/baseline: {baseline_seconds / stage_seconds:.2f}x")


if __name__ == "__main__":
    main()
