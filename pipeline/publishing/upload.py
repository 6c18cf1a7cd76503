"""The upload: a Hub token found without ever showing it, the repo created if needed, the folder sent in one commit.

`upload_folder` sends large files through the Hub's large-file storage (Xet when `hf_xet` is installed, else LFS)
and small ones inline, so a multi-shard 15 GB model needs nothing special here.
"""

from __future__ import annotations

from pathlib import Path

# Never uploaded: the runner's markers and any other hidden file, at any depth.
IGNORED = [".*", "**/.*"]


def hub_token() -> str | None:
    """HF_TOKEN, else the token saved by `hf auth login` (huggingface_hub's own lookup)."""
    from huggingface_hub import get_token

    return get_token()


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def upload_folder(folder: Path, repo_id: str, *, private: bool, token: str, commit_message: str) -> dict:
    """Create `repo_id` if it does not exist (an existing repo keeps its visibility) and upload `folder` as one
    commit. Returns the repo id (with its namespace), the repo URL and the commit URL; never the token."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        repo_type="model",
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=IGNORED,
    )
    return {"repo_id": repo.repo_id, "repo_url": str(repo), "commit_url": commit.commit_url}
