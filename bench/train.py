"""Benchmark the train stage against a plain script calling Unsloth + TRL's SFTTrainer directly, same model and data.

    .venv/bin/python bench/train.py                  # tiny Qwen2 (hidden 256, 4 layers), 40 steps, unsloth backend
    .venv/bin/python bench/train.py --backend transformers --steps 60

Each side runs in its own process (`import unsloth` patches libraries process-wide), alternately, `--repeats` times;
the best of each is kept. Tokens are the non-padding tokens the Trainer counted (`num_input_tokens_seen`, enabled on
both sides); tokens/s uses the Trainer's own train_runtime, so model loading and imports are reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("FTMERGE_BENCH_DIR", Path(tempfile.gettempdir()) / "ftmerge-bench")) / "train"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_inputs(hidden: int, layers: int, rows: int) -> tuple[Path, Path]:
    """(base model dir, prepared dir) cached by shape: ChatML rows with assistant masks, as prepare writes them."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pipeline.demo.synthetic import skill_messages
    from pipeline.demo.tiny import build_tokenizer, make_tiny_model

    root = CACHE / f"h{hidden}-l{layers}-r{rows}"
    if (root / "prepared" / "report.json").is_file():
        return root / "base", root / "prepared"
    shutil.rmtree(root, ignore_errors=True)
    tokenizer_dir = build_tokenizer(root / "tokenizer")
    base = make_tiny_model(root / "base", tokenizer_dir, hidden_size=hidden, num_layers=layers)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)

    def row(messages):
        ids, mask = [], []
        for message in messages:
            head = tokenizer(f"<|im_start|>{message['role']}\n", add_special_tokens=False)["input_ids"]
            body = tokenizer(message["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
            ids += head + body + newline
            mask += [0] * len(head) + [int(message["role"] == "assistant")] * len(body) + [0] * len(newline)
        return {"input_ids": ids, "assistant_masks": mask}

    conversations = [skill_messages("sort", rng) + skill_messages("reverse", rng) for _ in range(rows)]
    Dataset.from_list([row(c) for c in conversations]).save_to_disk(str(root / "prepared" / "train"))
    Dataset.from_list([row(c) for c in conversations[:8]]).save_to_disk(str(root / "prepared" / "eval"))
    (root / "prepared" / "report.json").write_text(json.dumps({"end_of_turn_token": "<|im_end|>"}))
    return base, root / "prepared"


def train_config(backend: str, steps: int):
    from pipeline.recipe import TrainConfig

    return TrainConfig(
        backend=backend,
        max_seq_length=256,
        load_in_4bit=False,
        max_steps=steps,
        batch_size=8,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        learning_rate=1e-3,
        optim="adamw_torch",
        save_steps=10 * steps,
        logging_steps=10,
        lora={"r": 16, "alpha": 32},
    )


def run_stage(base: Path, prepared: Path, work: Path, backend: str, steps: int) -> dict:
    from pipeline.training.trainer import TrainingJob, train_lora

    metrics = train_lora(TrainingJob(base, prepared, work, train_config(backend, steps), base_model=str(base)))
    return {"tokens": metrics["tokens"], "train_seconds": metrics["seconds"]}


def run_plain(base: Path, prepared: Path, work: Path, backend: str, steps: int) -> dict:
    """What a user would write without ftmerge: load, add LoRA, SFTTrainer on the same rows and settings."""
    config = train_config(backend, steps)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            str(base), max_seq_length=config.max_seq_length, dtype=None, load_in_4bit=False
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            target_modules=TARGET_MODULES,
            use_gradient_checkpointing="unsloth",
            random_state=config.seed,
        )
    else:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
        )
    from datasets import load_from_disk
    from trl import SFTConfig, SFTTrainer

    arguments = SFTConfig(
        output_dir=str(work),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=0,
        optim="adamw_torch",
        logging_steps=10,
        save_strategy="no",
        max_length=config.max_seq_length,
        report_to="none",
        use_cpu=True,
        gradient_checkpointing=backend == "transformers",
        include_num_input_tokens_seen="non_padding",
        seed=config.seed,
    )
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        args=arguments,
        train_dataset=load_from_disk(str(prepared / "train")).select_columns(["input_ids", "assistant_masks"]),
    )
    result = trainer.train()
    model.save_pretrained(work / "adapter")
    return {"tokens": trainer.state.num_input_tokens_seen, "train_seconds": result.metrics["train_runtime"]}


def measure(side: str, base: Path, prepared: Path, backend: str, steps: int, threads: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"ftmerge-bench-train-{side}-"))
    started = time.perf_counter()
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--side",
            side,
            "--base",
            str(base),
            "--prepared",
            str(prepared),
            "--work",
            str(work),
            "--backend",
            backend,
            "--steps",
            str(steps),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)},
    )
    wall = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    if completed.returncode != 0:
        raise SystemExit(f"{side} failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**result, "wall_seconds": wall, "tokens_per_second": result["tokens"] / result["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["unsloth", "transformers"], default="unsloth")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP threads per side; on a shared 2-core machine more than 1 measures contention",
    )
    parser.add_argument("--side", choices=["stage", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run = run_stage if args.side == "stage" else run_plain
        print(json.dumps(run(args.base, args.prepared, args.work, args.backend, args.steps)))
        return
    base, prepared = build_inputs(args.hidden, args.layers, rows=args.steps * 8)
    results = {"stage": [], "plain": []}
    for _ in range(args.repeats):
        for side in ("plain", "stage"):
            results[side].append(measure(side, base, prepared, args.backend, args.steps, args.threads))
    best = {side: max(runs, key=lambda r: r["tokens_per_second"]) for side, runs in results.items()}
    for side, result in best.items():
        print(
            f"{side:>5}: {result['tokens']} tokens in {result['train_seconds']:.2f}s of training = "
            f"{result['tokens_per_second']:.0f} tokens/s ({result['wall_seconds']:.1f}s wall with imports, load)"
        )
    ratio = best["stage"]["tokens_per_second"] / best["plain"]["tokens_per_second"]
    print(f"stage / plain tokens/s: {ratio:.3f}  (overhead {100 * (1 - ratio):+.1f}%; target under 5%)")
    if best["stage"]["tokens"] != best["plain"]["tokens"]:
        print(f"note: token counts differ ({best['stage']['tokens']} vs {best['plain']['tokens']})")


if __name__ == "__main__":
    main()
