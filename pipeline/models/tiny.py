"""Tiny real models for tests and the offline demo: a BPE tokenizer with ChatML special tokens and random or
briefly trained Qwen2 models, small enough to build and train on a CPU in seconds.

The demo's synthetic language: "words" are the letters a-j. The base model learns plain text in it; the target
("instruct") model is the base further trained on one skill in ChatML (copy a list); the demo's two fine-tunes
teach two other skills (reverse, sort), so the evaluate table can show what a merge keeps and what it learns.

    python -m pipeline.models.tiny OUT_DIR      # build (or reuse) the demo's base and target models
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.data.synthetic import plain_document, skill_messages, tokenizer_corpus

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2-7B-Instruct's chat template, verbatim.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEMO_VERSION = "1"


def build_tokenizer(out_dir: Path, *, vocab_size: int = 400, eos_token: str = "<|endoftext|>") -> Path:
    """A byte-level BPE like Qwen2's, trained on the synthetic corpus, saved as a fast tokenizer with the Qwen2
    ChatML template. eos `<|endoftext|>` is the base's; pass `<|im_end|>` for a target ("instruct") tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(tokenizer_corpus(random.Random(0)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token, pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=2048)
    fast.chat_template = QWEN2_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def make_tiny_model(out_dir: Path, tokenizer_dir: Path, *, hidden_size: int = 64, num_layers: int = 2,
                    tie_word_embeddings: bool = False, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    max_shard_size: str | int | None = None) -> Path:
    """A random Qwen2ForCausalLM in safetensors with generation_config and the tokenizer's files beside it. The
    embedding has more rows than the tokenizer has tokens (rounded up to 64), as Qwen2's has."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=math.ceil(len(tokenizer) / 64) * 64, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id, use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    eos_ids = sorted({tokenizer.eos_token_id, pad_id})
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_ids, pad_token_id=pad_id)
    return save_model(model, tokenizer_dir, out_dir, max_shard_size=max_shard_size)


def derive_tiny_target(base_dir: Path, out_dir: Path, tokenizer_dir: Path, *, scale: float = 0.01,
                       seed: int = 1) -> Path:
    """A target that derives from a base, as an instruct model does: the base's weights plus small random deltas,
    saved with the target's tokenizer (its eos becomes the model's eos)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.add_(noise.to(parameter.dtype))
    set_eos(model, tokenizer)
    return save_model(model, tokenizer_dir, out_dir)


def set_eos(model, tokenizer) -> None:
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, pad_id})


def save_model(model, tokenizer_dir: Path, out_dir: Path, *, max_shard_size: str | int | None = None) -> Path:
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(out_dir, **kwargs)
    for file in Path(tokenizer_dir).iterdir():
        if file.is_file() and file.name != "config.json" and not file.name.startswith("model"):
            shutil.copy2(file, out_dir / file.name)
    return out_dir


def build_demo_assets(out_dir: Path, *, steps: int = 300, seed: int = 0) -> dict[str, Path]:
    """The demo's models, built once and cached in `out_dir` (reused while `.complete` matches this version and
    these settings): `base` pretrained `steps` steps on the synthetic language, `target` = base fully fine-tuned
    on the copy skill in ChatML, with an <|im_end|> eos tokenizer. Written to a temporary sibling, then renamed."""
    out_dir = Path(out_dir)
    stamp = {"version": DEMO_VERSION, "steps": steps, "seed": seed}
    paths = {"base": out_dir / "base", "target": out_dir / "target"}
    marker = out_dir / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return paths
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _build_demo_models(work, steps=steps, seed=seed)
        (work / ".complete").write_text(json.dumps(stamp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def _build_demo_models(work: Path, *, steps: int, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tokenizer(work / "tokenizer.base")
    build_tokenizer(work / "tokenizer.target", eos_token="<|im_end|>")
    make_tiny_model(work / "random", work / "tokenizer.base", hidden_size=128, num_layers=2, seed=seed,
                    dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(work / "random", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer.base")
    pretrain(model, tokenizer, steps=steps, seed=seed)
    save_model(model.to(torch.bfloat16), work / "tokenizer.base", work / "base")
    target_tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer.target")
    train_skill(model.float(), target_tokenizer, "copy", steps=steps, seed=seed)
    set_eos(model, target_tokenizer)
    save_model(model.to(torch.bfloat16), work / "tokenizer.target", work / "target")
    for scratch in ("random", "tokenizer.base", "tokenizer.target"):
        shutil.rmtree(work / scratch)


def pretrain(model, tokenizer, *, steps: int, seed: int, batch_size: int = 32, block: int = 64) -> float:
    """Next-token training on packed plain documents of the synthetic language, separated by eos."""
    rng = random.Random(seed)

    def batch() -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(batch_size):
            ids: list[int] = []
            while len(ids) < block:
                ids += [*tokenizer.encode(plain_document(rng), add_special_tokens=False), tokenizer.eos_token_id]
            rows.append(ids[:block])
        input_ids = torch.tensor(rows)
        return {"input_ids": input_ids, "labels": input_ids}

    return _train(model, batch, steps=steps, learning_rate=3e-3, seed=seed)


def train_skill(model, tokenizer, skill: str, *, steps: int, seed: int, batch_size: int = 32) -> float:
    """Full fine-tune on one skill in the tokenizer's chat template, loss on the assistant reply and its <|im_end|>."""
    rng = random.Random(seed + 1)

    def batch() -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for _ in range(batch_size):
            messages = skill_messages(skill, rng)
            prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            ids = tokenizer.encode(full, add_special_tokens=False)
            rows.append(ids)
            labels.append([-100] * len(prompt_ids) + ids[len(prompt_ids):])
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
        }

    return _train(model, batch, steps=steps, learning_rate=3e-3, seed=seed)


def _train(model, next_batch, *, steps: int, learning_rate: float, seed: int) -> float:
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    progress = tqdm(range(steps), desc="tiny demo model", leave=False, mininterval=5)
    for _ in progress:
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description="Build (or reuse) the demo's tiny base and target models.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    for name, path in build_demo_assets(arguments.out_dir, steps=arguments.steps, seed=arguments.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
