"""Mean loss on assistant tokens: the tokens prepare marked in `assistant_masks`, exactly those training learns.

Prompts, system turns and padding are never scored, so a model is judged on its answers (and on ending its turn),
not on how well it predicts the user's question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

IGNORE_INDEX = -100


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


@torch.no_grad()
def assistant_token_loss(model, input_ids: list[list[int]], assistant_masks: list[list[int]], *, batch_size: int,
                         pad_id: int, description: str = "loss") -> LossResult:
    """Sum of next-token cross-entropy (in float32) over every position whose token is an assistant token. Only
    the scored positions' logits are upcast: a float32 copy of all of them (batch × length × a 152k vocabulary) is
    40 GB for 8 rows of 8192 tokens, more than the GPU a 7B is evaluated on has."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    rows = list(zip(input_ids, assistant_masks, strict=True))
    for start in tqdm(range(0, len(rows), batch_size), desc=description, unit="batch", leave=False):
        batch = collate(rows[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        shifted_labels = batch["labels"][:, 1:].to(device)
        scored = shifted_labels != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), shifted_labels[scored],
                                                   reduction="sum").item()
        tokens += int(scored.sum())
        del logits
    return LossResult(total, tokens)
