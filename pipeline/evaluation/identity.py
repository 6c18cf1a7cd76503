"""What a stage's fingerprint hashes for the retention sets: light to compute (no torch, no datasets), since planning
a run (`--status`, `--dry-run`) computes it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data import templates
from pipeline.fingerprint import content_fingerprint

if TYPE_CHECKING:
    from pipeline.recipe import RetentionSet


def retention_identity(
    retention: list[RetentionSet], *, chat_template: str, base_model: str, target_model: str, max_length: int
) -> dict:
    """What the retention sets are rendered from (their content, the chat template, the base tokenizer, the length
    limit), as prepare fingerprints a fine-tune's data."""

    def content(reference: str) -> str:
        local = Path(reference).expanduser()  # a local file or directory, `~` expanded as it is read; else a Hub id
        return content_fingerprint(local) if local.exists() else reference

    return {
        "data": {r.name: content(r.dataset.path) for r in retention},
        "chat_template": chat_template,
        "template_identity": templates.template_identity(chat_template, target_model),
        "base_tokenizer": templates.tokenizer_fingerprint(base_model),
        "max_seq_length": max_length,
    }
