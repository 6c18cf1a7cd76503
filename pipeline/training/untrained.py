"""Embedding rows the base never trained: Qwen2 base checkpoints keep all-zero rows for the ChatML tokens
(`<|im_start|>`, `<|im_end|>`), which every rendered conversation uses.

Unsloth's SFTTrainer on a GPU (unsloth_zoo `fix_untrained_tokens`) raises on data that uses such rows unless
embed_tokens and lm_head are trained, and training them would make an adapter that overwrites the target's
embeddings. Like Unsloth's own fix, the rows are set to the mean of the trained rows, for training only: the adapter
holds no embeddings, and the target it is applied to has its own trained rows. Both backends do it, so a base trains
the same whichever runs.
"""

from __future__ import annotations

import torch

# Unsloth's criterion: every value of the row within ±eps.
UNTRAINED_EPS = 1e-16
TOKENIZER_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def untrained_rows(matrix: torch.Tensor, ids: list[int]) -> list[int]:
    """The ids among `ids` whose row of `matrix` is all zero (within UNTRAINED_EPS)."""
    if not ids:
        return []
    largest = matrix[ids].abs().amax(dim=1)
    return [i for i, value in zip(ids, largest.tolist(), strict=True) if value <= UNTRAINED_EPS]


@torch.no_grad()
def reset_to_trained_mean(matrix: torch.Tensor, rows: list[int]) -> None:
    """Set `rows` to the float32 mean of the other rows, without a copy of the matrix (a 7B's is 1 GB)."""
    total = matrix.sum(dim=0, dtype=torch.float32) - matrix[rows].sum(dim=0, dtype=torch.float32)
    matrix[rows] = (total / (matrix.shape[0] - len(rows))).to(matrix.dtype)


def fix_untrained_special_tokens(model, tokenizer) -> list[str]:
    """Reset the base's untrained rows of the tokenizer's added tokens in embed_tokens and lm_head; returns the
    tokens whose input embedding was untrained. Ordinary vocabulary rows are always trained; like Unsloth, the
    tokenizer's own bos/eos/pad/... are left alone (a zero pad row is the padding embedding)."""
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    own = {getattr(tokenizer, f"{kind}_token_id", None) for kind in TOKENIZER_ROLES}
    added = sorted(
        i for i in tokenizer.added_tokens_decoder if i not in own and i < min(embeddings.shape[0], head.shape[0])
    )
    untrained = untrained_rows(embeddings, added)
    head_untrained = untrained_rows(head, added) if head is not embeddings else []
    if untrained:
        reset_to_trained_mean(embeddings, untrained)
    if head_untrained:
        reset_to_trained_mean(head, head_untrained)
    return tokenizer.convert_ids_to_tokens(untrained)
