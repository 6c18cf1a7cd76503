"""Tiny real models for tests and the offline demo: tokenizers with ChatML special tokens and random Qwen2 models,
small enough to build and train on a CPU in seconds. The demo's trained lineage is built in pipeline/demo/lineage.py.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.demo.synthetic import tokenizer_corpus

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2-7B-Instruct's chat template, verbatim.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(out_dir: Path, *, vocab_size: int = 400, eos_token: str = "<|endoftext|>") -> Path:
    """A byte-level BPE like Qwen2's, trained on the synthetic corpus, saved as a fast tokenizer with the Qwen2
    ChatML template. eos `<|endoftext|>` is the base's; pass `<|im_end|>` for a target ("instruct") tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(random.Random(0)), trainer=trainer)
    return save_fast_tokenizer(tokenizer, out_dir, eos_token=eos_token)


def build_word_tokenizer(out_dir: Path, corpus: Iterable[str], *, eos_token: str = "<|endoftext|>") -> Path:
    """A byte-level BPE with Qwen2's pre-tokenizer, trained until every word of `corpus` is one token (a letter is
    "a" at a line start and "Ġa" after a space, as in Qwen2). For a synthetic language of single letters this keeps
    input and answer tokens aligned, which a small BPE's merges across letters would not. transformers loads it as
    a Qwen2Tokenizer, which rebuilds exactly this pipeline from the vocabulary and merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return save_fast_tokenizer(tokenizer, out_dir, eos_token=eos_token)


def save_fast_tokenizer(tokenizer, out_dir: Path, *, eos_token: str) -> Path:
    """A trained `tokenizers.Tokenizer` saved as a transformers fast tokenizer with Qwen2's special tokens and
    ChatML template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=2048,
    )
    fast.chat_template = QWEN2_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def make_tiny_model(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    mlp_ratio: int = 3,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int | None = None,
) -> Path:
    """A random Qwen2ForCausalLM in safetensors with generation_config and the tokenizer's files beside it. The
    embedding has more rows than the tokenizer has tokens (rounded up to 64), as Qwen2's has."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=(len(tokenizer) // 64 + 1) * 64,  # always spare rows, as Qwen2 has
        hidden_size=hidden_size,
        intermediate_size=hidden_size * mlp_ratio,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    eos_ids = sorted({tokenizer.eos_token_id, pad_id})
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_ids, pad_token_id=pad_id)
    return save_model(model, tokenizer_dir, out_dir, max_shard_size=max_shard_size)


def derive_tiny_target(
    base_dir: Path, out_dir: Path, tokenizer_dir: Path, *, scale: float = 0.01, seed: int = 1
) -> Path:
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
