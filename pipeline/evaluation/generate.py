"""Greedy answers to short-answer sets, scored by exact match and containment against the reference answer.

The prompt is the prepared conversation up to the start of its last assistant span: exactly the ids prepare
rendered (the chat template's generation prompt included), so no template is re-applied and nothing can drift
from what training saw. The reference is the last assistant message's content.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


@dataclass(frozen=True)
class GenerationResult:
    exact_match: float
    contains: float
    samples: int
    examples: list[dict]


def last_assistant_start(mask: list[int]) -> int:
    """Index of the first token of the last run of 1s in an assistant mask."""
    end = max(i for i, bit in enumerate(mask) if bit)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def prompt_ids(input_ids: list[int], mask: list[int]) -> list[int]:
    if not any(mask):
        raise ValueError("a row without assistant tokens has no answer to generate")
    return input_ids[: last_assistant_start(mask)]


def reference_answer(messages: list[dict]) -> str:
    answers = [m["content"] for m in messages if m.get("role") == "assistant"]
    if not answers:
        raise ValueError("a conversation without an assistant message has no reference answer")
    return answers[-1]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, attention


def greedy_answers(model, tokenizer, prompts: list[list[int]], **settings) -> list[str]:
    """The texts of `greedy_replies` (same settings)."""
    return [reply.text for reply in greedy_replies(model, tokenizer, prompts, **settings)]


@dataclass(frozen=True)
class Reply:
    text: str
    finished: bool  # a stop token ended it (else max_new_tokens cut it)


def greedy_settings(stop_ids: list[int], pad_id: int, max_new_tokens: int, **outputs) -> GenerationConfig:
    """Greedy decoding that ends at `stop_ids`, whatever the model's own generation_config says, so every model
    compared generates alike. `outputs` asks `generate` for more than the ids (logits, a dict)."""
    return GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, **outputs
    )


@torch.no_grad()
def greedy_replies(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    stop_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    description: str = "generate",
) -> list[Reply]:
    """Greedy continuations of each prompt (left-padded in batches), decoded without special tokens, and whether a
    stop token ended each. Every model gets the same stop tokens and settings, whatever its own generation_config
    says."""
    settings = greedy_settings(stop_ids, pad_id, max_new_tokens)
    device = next(model.parameters()).device
    replies = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=description, unit="batch", leave=False):
        ids, attention = left_pad(prompts[start : start + batch_size], pad_id)
        output = model.generate(
            input_ids=ids.to(device), attention_mask=attention.to(device), generation_config=settings
        )
        new = output[:, ids.shape[1] :].cpu()
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        stopped = torch.isin(new, torch.tensor(stop_ids)).any(dim=1).tolist()
        replies += [Reply(text, finished) for text, finished in zip(texts, stopped, strict=True)]
    return replies


def score_answers(answers: list[str], references: list[str], keep_examples: int = 3) -> GenerationResult:
    """Exact match after stripping surrounding whitespace; `contains` when the reference appears in the answer."""
    exact = [a.strip() == r.strip() for a, r in zip(answers, references, strict=True)]
    contains = [r.strip() in a for a, r in zip(answers, references, strict=True)]
    examples = [{"reference": r, "answer": a} for a, r in list(zip(answers, references, strict=True))[:keep_examples]]
    count = len(references)
    return GenerationResult(
        sum(exact) / count if count else float("nan"), sum(contains) / count if count else float("nan"), count, examples
    )


def chat_reply(model_dir: Path, prompt: str, *, max_new_tokens: int = 48, trust_remote_code: bool = False) -> str:
    """One greedy reply of a saved model to one user message, rendered with the model's own chat template (a merge
    carries the target's). On a GPU the model is spread over GPU and CPU as needed."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template; the merge should copy the target's")
    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", use_safetensors=True, trust_remote_code=trust_remote_code, **placement
    )
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
