"""resolve_model on a Hub id downloads the shards the index names and the config, tokenizer and generation files,
nothing else: a Mistral repo's `consolidated.safetensors` and `original/*` (14-25 GB more) stay on the Hub.

The Hub's servers cannot be reached from here: huggingface_hub's HTTP layer is replaced (an httpx MockTransport
installed with `set_client_factory`, the library's documented seam, as in test_publish) by a fake Hub serving one
repository; everything above the transport (snapshot_download, hf_hub_download, the cache) is real."""

from __future__ import annotations

import contextlib
import hashlib
import json

import httpx
import pytest
from helpers.hub import hub_answered_by

from pipeline.models.hub import ModelNotFound, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHT_MAP = {
    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
    "lm_head.weight": "model-00002-of-00002.safetensors",
}
MISTRAL_STYLE_REPO = {
    "config.json": b'{"model_type": "mistral", "rope_theta": 1000000.0}',
    "generation_config.json": b"{}",
    "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": WEIGHT_MAP}).encode(),
    "model-00001-of-00002.safetensors": b"shard one",
    "model-00002-of-00002.safetensors": b"shard two",
    "consolidated.safetensors": b"the same weights again, in Mistral's own layout",
    "original/consolidated.00.pth": b"a pickle",
    "original/params.json": b"{}",
    "original/tokenizer.model": b"sentencepiece",
    "pytorch_model.bin": b"a pickle",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "tokenizer.model": b"sentencepiece",
    "modeling_custom.py": b"# remote code",
    "README.md": b"# card",
}
EXPECTED = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
}


class FakeHub:
    """Answers repo_info, the tree listing and file resolution for `repo_id`; records the files served."""

    def __init__(self, repo_id: str, files: dict[str, bytes], commit: str = COMMIT):
        self.repo_id, self.files, self.commit = repo_id, files, commit
        self.served: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path in (f"/api/models/{self.repo_id}/revision/main", f"/api/models/{self.repo_id}"):
            return httpx.Response(
                200,
                json={"id": self.repo_id, "sha": self.commit, "siblings": [{"rfilename": name} for name in self.files]},
            )
        if path.startswith(f"/api/models/{self.repo_id}/tree/"):
            return httpx.Response(
                200,
                json=[
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in self.files.items()
                ],
            )
        for revision in ("main", self.commit):
            prefix = f"/{self.repo_id}/resolve/{revision}/"
            if path.startswith(prefix):
                name = path.removeprefix(prefix)
                if name not in self.files:
                    # As the Hub answers: the commit is named, so huggingface_hub caches that the file is absent.
                    return httpx.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit})
                data = self.files[name]
                headers = {
                    "X-Repo-Commit": self.commit,
                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                    "Content-Length": str(len(data)),
                }
                if request.method == "HEAD":
                    return httpx.Response(200, headers=headers)
                self.served.append(name)
                return httpx.Response(200, headers=headers, content=data)
        return httpx.Response(404, json={"error": f"not part of the fake Hub: {request.method} {path}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with contextlib.ExitStack() as served:

        def serve(repo_id: str, files: dict[str, bytes]) -> FakeHub:
            return served.enter_context(hub_answered_by(FakeHub(repo_id, files)))

        yield serve


def downloaded(directory) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_only_the_indexed_shards_and_the_model_files_are_downloaded(hub):
    fake = hub("mistralai/tiny", MISTRAL_STYLE_REPO)
    directory = resolve_model("mistralai/tiny", "target_model")
    assert downloaded(directory) == EXPECTED
    assert set(fake.served) <= EXPECTED, "nothing else is fetched"
    assert (directory / "model-00002-of-00002.safetensors").read_bytes() == b"shard two"


def test_remote_code_comes_too_when_trusted(hub):
    hub("mistralai/tiny", MISTRAL_STYLE_REPO)
    assert downloaded(resolve_model("mistralai/tiny", trust_remote_code=True)) == EXPECTED | {"modeling_custom.py"}


def test_a_repo_without_an_index_gets_its_single_file_and_works_offline_afterwards(hub, monkeypatch):
    from huggingface_hub import constants

    files = {
        "config.json": b"{}",
        "model.safetensors": b"weights",
        "consolidated.safetensors": b"again",
        "tokenizer.json": b"{}",
    }
    hub("org/single", files)
    directory = resolve_model("org/single")
    assert downloaded(directory) == {"config.json", "model.safetensors", "tokenizer.json"}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/single") == directory


def test_a_repo_without_safetensors_is_refused(hub):
    hub("org/pickles", {"config.json": b"{}", "pytorch_model.bin": b"a pickle"})
    with pytest.raises(ModelNotFound, match="no safetensors weights"):
        resolve_model("org/pickles", "base_model")


def test_offline_with_nothing_cached_says_so(hub, monkeypatch):
    from huggingface_hub import constants

    hub("org/single", {"config.json": b"{}", "model.safetensors": b"weights"})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set"):
        resolve_model("org/single", "base_model")


def test_a_new_revision_on_the_hub_is_a_new_model_and_offline_the_cached_one_stands(hub, monkeypatch):
    """A Hub id is fingerprinted by the commit it resolves to: a push to the repo makes every stage that read the
    model stale; offline, the commit the cache holds for it."""
    from huggingface_hub import constants

    from pipeline.fingerprint import model_fingerprint
    from pipeline.models.hub import hub_revision

    fake = hub("org/single", {"config.json": b"{}", "model.safetensors": b"weights"})
    hub_revision.cache_clear()
    before = model_fingerprint("org/single")
    resolve_model("org/single")  # caches the files and refs/main = the commit
    fake.commit = "f" * 40
    hub_revision.cache_clear()
    after = model_fingerprint("org/single")
    assert after != before
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_revision.cache_clear()
    assert model_fingerprint("org/single") == before, "offline: the cached commit"
    hub_revision.cache_clear()
