"""Turn a model reference (local directory or Hub id) into a local directory, with errors a user can act on."""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "*.model",
                       "*.tiktoken"]


class ModelNotFound(FileNotFoundError):
    """A model reference that is neither a local directory nor a reachable Hub id."""


def check_model_reference(reference: str, key: str) -> None:
    """Cheap check used by --dry-run and before any stage runs: loads and downloads nothing."""
    path = Path(reference)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{key}: {reference} exists but has no config.json; expected a model directory")
        return
    if reference.startswith((".", "/", "~")) or not HUB_ID.match(reference):
        raise ModelNotFound(f"{key}: local model directory not found: {reference} (nor is it a Hub id, org/name)")


def resolve_model(reference: str, key: str = "model", *, trust_remote_code: bool = False) -> Path:
    """A local directory for `reference`, downloading weights, configs and tokenizer files only (no pickles) when it
    is a Hub id; its Python files too with `trust_remote_code`, or the model's own code (named in config.json's
    `auto_map`) would be missing from the directory transformers loads. Offline or unreachable Hub →
    ModelNotFound naming the key and the fix."""
    path = Path(reference)
    if path.is_dir():
        return path.resolve()
    check_model_reference(reference, key)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*MODEL_FILE_PATTERNS, *(["*.py"] if trust_remote_code else [])]
    try:
        return Path(snapshot_download(reference, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        # The first line says which (gated, not found, unreachable); huggingface_hub's messages hold no token.
        detail = (str(error).strip().splitlines() or [""])[0]
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"{type(error).__name__}: {detail}" if detail else type(error).__name__)
        raise ModelNotFound(
            f"{key}: cannot get {reference} from the Hugging Face Hub ({why}). Download it on a machine with "
            f"network (`hf download {reference}`; a gated model needs its license accepted and HF_TOKEN) or point "
            f"{key} to a local directory."
        ) from None
