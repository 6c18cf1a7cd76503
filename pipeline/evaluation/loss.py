"""Mean loss on assistant tokens: the tokens prepare marked in `assistant_masks`, exactly those training learns.

Prompts, system turns and padding are never scored, so a model is judged on its answers (and on ending its turn),
not on how well it predicts the user's question.

Memory stays bounded whatever the rows' length and the vocabulary: the decoder's hidden states are computed for a
batch of at most `batch_tokens` (padded) tokens, and `lm_head` is applied to the scored positions only, a chunk of
positions at a time. The model's own forward would hold batch × length × vocabulary logits (8 rows of 8192 tokens
with Qwen2's 152k vocabulary: 20 GB in bf16, more than the GPU a 7B is evaluated on has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

IGNORE_INDEX = -100
# Logits computed at once: 441 positions of a 152k vocabulary; with their float32 copy and log-softmax ~0.7 GB.
LOGITS_PER_CHUNK = 2**26
# Positions compared once per model with its own forward, to prove its logits are lm_head(hidden states).
CHECK_POSITIONS = 16


@dataclass(frozen=True)
class LossResult:
    """Summed negative log-likelihood over the scored tokens; the mean is token-weighted over the whole set."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean) if self.tokens else math.nan


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (the ids where the mask is 1, else -100)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for index, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"row {index}: input_ids has {len(ids)} ids but assistant_masks has {len(mask)}")
        ids_tensor = torch.tensor(ids, dtype=torch.long)
        input_ids[index, : len(ids)] = ids_tensor
        attention_mask[index, : len(ids)] = 1
        labels[index, : len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), ids_tensor, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Row indices grouped longest first, so a batch's padded size (rows × its longest row) stays within
    `batch_tokens` and rows of similar length share a batch; a row longer than the budget is a batch alone."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def summed_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> float:
    """Σ −log softmax(head(hidden))[target] in float32, `LOGITS_PER_CHUNK` logits at a time."""
    chunk = max(1, LOGITS_PER_CHUNK // head.weight.shape[0])
    total = 0.0
    for start in range(0, len(targets), chunk):
        logits = head(hidden[start : start + chunk]).float()
        total += torch.nn.functional.cross_entropy(logits, targets[start : start + chunk], reduction="sum").item()
        del logits
    return total


def check_logits_are_head_of_hidden(model, decoder, head, ids: list[int]) -> None:
    """Raise for an architecture that changes its logits after `lm_head` (Gemma 2's soft-capping, Cohere's
    scale): the loss computed from hidden states would silently differ from the model's."""
    device = head.weight.device
    sample = torch.tensor([ids[:CHECK_POSITIONS]], device=device)
    expected = model(input_ids=sample, use_cache=False).logits[0].float()
    ours = head(decoder(input_ids=sample, use_cache=False).last_hidden_state[0].to(device)).float()
    tolerance = 1e-2 * expected.abs().max().item() + 1e-4
    if not torch.allclose(ours, expected, rtol=1e-2, atol=tolerance):
        raise ValueError(
            f"{type(model).__name__}: its logits are not lm_head(hidden states) (largest difference "
            f"{(ours - expected).abs().max().item():.3g}); the bounded-memory loss does not support it"
        )


@torch.no_grad()
def assistant_token_loss(
    model,
    input_ids: list[list[int]],
    assistant_masks: list[list[int]],
    *,
    batch_tokens: int,
    pad_id: int,
    description: str = "loss",
) -> LossResult:
    """Sum of next-token cross-entropy (in float32) over every position whose token is an assistant token, in
    batches of at most `batch_tokens` padded tokens; logits exist only for scored positions, a chunk at a time."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = next(decoder.parameters()).device
    rows = list(zip(input_ids, assistant_masks, strict=True))
    if rows:
        check_logits_are_head_of_hidden(model, decoder, head, rows[0][0])
    total, tokens = 0.0, 0
    for indices in tqdm(
        token_batches([len(ids) for ids, _ in rows], batch_tokens), desc=description, unit="batch", leave=False
    ):
        batch = collate([rows[index] for index in indices], pad_id)
        hidden = decoder(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).last_hidden_state
        shifted_labels = batch["labels"][:, 1:].to(hidden.device)
        scored = shifted_labels != IGNORE_INDEX
        scored_hidden = hidden[:, :-1][scored].to(head.weight.device)
        del hidden
        total += summed_cross_entropy(scored_hidden, shifted_labels[scored].to(head.weight.device), head)
        tokens += int(scored.sum())
    return LossResult(total, tokens)
