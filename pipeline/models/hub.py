"""Turn a model reference (local directory or Hub id) into a local directory, with errors a user can act on."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def local_config(reference: str) -> dict | None:
    """A local model's config.json, None for a Hub id (its config is read when a stage runs: checks download
    nothing)."""
    path = Path(reference) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


@functools.cache
def hub_revision(reference: str) -> str | None:
    """The commit a Hub id stands for in this process: the Hub's answer for its main branch (one metadata request),
    or, offline or unreachable, the commit the local cache holds for it; None when neither knows. Cached, so a run
    fingerprints and downloads the same commit even when the repo moves on while it runs."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if not HUB_ID.match(reference):
        return None
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(reference, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        except (HfHubHTTPError, OSError):
            pass
    return _cached_revision(reference)


def _cached_revision(reference: str) -> str | None:
    """The cache's main branch, else its newest snapshot (`resolve_model` downloads by commit, which records no
    branch)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=reference, repo_type="model")
    if (folder / "refs" / "main").is_file():
        return (folder / "refs" / "main").read_text().strip()
    snapshots = sorted((folder / "snapshots").glob("*"), key=lambda snapshot: snapshot.stat().st_mtime)
    return snapshots[-1].name if snapshots else None


def resolve_model(reference: str, key: str = "model", *, trust_remote_code: bool = False) -> Path:
    """A local directory for `reference`. A Hub id is downloaded: its index first, then only the shards it names
    and its config, tokenizer and generation files (no pickles, no duplicate checkpoints); its Python files too
    with `trust_remote_code`, or the model's own code (named in config.json's `auto_map`) would be missing from
    the directory transformers loads. Offline or unreachable Hub → ModelNotFound naming the key and the fix."""
    path = Path(reference)
    if path.is_dir():
        return path.resolve()
    check_model_reference(reference, key)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from pipeline.models.safetensors_io import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES

    # Besides the weights the index names: config, tokenizer (chat template included) and generation files, at the
    # top level. No wildcard over weights: Mistral repos also hold consolidated.safetensors and original/*, 14-25 GB.
    metadata = ["config.json", INDEX_FILE, *TOKENIZER_FILES, "*.tiktoken"]
    revision = hub_revision(reference)
    try:
        patterns = [*weight_files(reference, revision), *metadata, *(["*.py"] if trust_remote_code else [])]
        snapshot = Path(snapshot_download(reference, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise ModelNotFound(unreachable(reference, key, error)) from None
    if not (snapshot / INDEX_FILE).is_file() and not (snapshot / SINGLE_FILE).is_file():
        raise ModelNotFound(
            f"{key}: {reference} has no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}); only "
            "safetensors models are supported"
        )
    return snapshot


def weight_files(reference: str, revision: str | None = None) -> list[str]:
    """The shards the Hub repo's index names (at `revision`), or its single `model.safetensors` when it has none."""
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from pipeline.models.safetensors_io import INDEX_FILE, SINGLE_FILE

    try:
        index = Path(hf_hub_download(reference, INDEX_FILE, revision=revision))
    except LocalEntryNotFoundError:  # offline (a subclass of the next): no index only if the cache knows it
        if try_to_load_from_cache(reference, INDEX_FILE, revision=revision) is not _CACHED_NO_EXIST:
            raise
        return [SINGLE_FILE]
    except EntryNotFoundError:
        return [SINGLE_FILE]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def unreachable(reference: str, key: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    # The first line says which (gated, not found, unreachable); huggingface_hub's messages hold no token.
    detail = (str(error).strip().splitlines() or [""])[0]
    why = (
        "HF_HUB_OFFLINE is set and it is not in the local cache"
        if offline
        else f"{type(error).__name__}: {detail}"
        if detail
        else type(error).__name__
    )
    return (
        f"{key}: cannot get {reference} from the Hugging Face Hub ({why}). Download it on a machine with "
        f"network (`hf download {reference}`; a gated model needs its license accepted and HF_TOKEN) or point "
        f"{key} to a local directory."
    )
