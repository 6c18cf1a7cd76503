"""publish: the folder and model card a dry run writes, the card's own usage code run on that folder, the checks
that stop a run before any work, and the upload itself through HfApi.

The Hub cannot be reached from here, so the upload test replaces huggingface_hub's HTTP layer (an httpx
MockTransport installed with `set_client_factory`, the library's documented seam) with a fake Hub that answers
the same endpoints; everything above the transport (HfApi, create_repo, upload_folder, the LFS protocol) is real.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re

import httpx
import pytest
import yaml
from helpers.hub import hub_answered_by
from helpers.models import make_adapter
from helpers.recipes import recipe_data, write_recipe
from helpers.stages import step_inputs

from pipeline.archive.importing import import_adapter
from pipeline.archive.store import verify_adapter
from pipeline.publishing.card import Release, find_license, model_card
from pipeline.publishing.folder import published_files
from pipeline.recipe import Recipe
from pipeline.run import main as run_pipeline

REPO_ID = "someone/tiny-merge"
TOKEN = "hf_ftmergeTestTokenThatMustNeverLeak"


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_models):
    """Two imported adapters, applied and merged, then published with `what: both` as a dry run."""
    root = tmp_path_factory.mktemp("publish")
    for seed, name in enumerate(("alpha", "beta")):
        import_adapter(
            root / "archive", make_adapter(tiny_models["base"], root / name, seed=seed), name, str(tiny_models["base"])
        )
    data = recipe_data(
        tiny_models,
        root / "run",
        name="publish-test",
        archive_dir=root / "archive",
        apply={"device": "cpu"},
        merge={"adapters": ["alpha", "beta"], "device": "cpu"},
        evaluate={"enabled": False},
        publish={"repo_id": REPO_ID, "what": "both", "dry_run": True},
    )
    assert run_pipeline([str(write_recipe(root / "recipe.yaml", data)), "--from", "apply"]) == 0
    return {"root": root, "recipe": root / "recipe.yaml", "run": root / "run", "folder": root / "run" / "publish"}


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_writes_the_folder_that_would_be_uploaded(published):
    folder, merged = published["folder"], published["run"] / "merge"
    merged_files = sorted(p.name for p in merged.iterdir() if p.is_file() and not p.name.startswith("."))
    adapters = [
        f"adapters/{name}/{file}"
        for name in ("alpha", "beta")
        for file in ("adapter_config.json", "adapter_model.safetensors")
    ]
    assert published_files(folder) == sorted(merged_files + adapters)  # README.md replaced, no manifests
    assert (folder / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()
    archived = published["root"] / "archive" / "alpha" / "adapter_model.safetensors"
    assert (folder / "adapters/alpha/adapter_model.safetensors").read_bytes() == archived.read_bytes()
    assert archived.stat().st_nlink == 1  # a copy, not a link into the append-only archive
    state = json.loads((published["run"] / "state" / "publish.json").read_text())
    assert state["summary"]["dry_run"] is True and "commit_url" not in state["summary"]


def test_card_records_lineage_and_config(published, tiny_models):
    card = (published["folder"] / "README.md").read_text()
    meta = front_matter(card)
    assert meta["tags"] == ["merge", "mergekit", "lora", "ties"]
    assert meta["library_name"] == "transformers"
    assert "base_model" not in meta and "license" not in meta  # local paths are not Hub ids; no license found
    for name in ("alpha", "beta"):
        sha = verify_adapter(published["root"] / "archive" / name)["files"]["adapter_model.safetensors"]
        assert re.search(rf"\| {name} \| imported \| .* \| `{sha}` \|", card), name
    assert f"`{tiny_models['base']}`" in card and f"`{tiny_models['target']}`" in card
    mergekit_yaml = (published["run"] / "merge" / "mergekit_config.yml").read_text()
    assert f"```yaml\n{mergekit_yaml.rstrip()}\n```" in card
    assert "## Evaluation" not in card  # evaluate did not run


def test_evaluation_report_goes_into_the_card(published, tmp_path):
    """With evaluate among its inputs, the stage puts its tables (without their title) and chart into the card."""
    from pipeline.recipe import load_recipe
    from pipeline.stages import StageRef, publish

    evaluate_dir = tmp_path / "evaluate"
    evaluate_dir.mkdir()
    table = "Mean loss on assistant tokens (perplexity); lower is better.\n\n| model | copy (retention) |\n|---|---:|\n"
    (evaluate_dir / "report.md").write_text(f"# Evaluation of publish-test\n\n{table}")
    (evaluate_dir / "report.png").write_bytes(b"\x89PNG chart")
    recipe = load_recipe(published["recipe"])
    out = tmp_path / "publish"
    out.mkdir()
    paths = {StageRef("merge"): published["run"] / "merge", StageRef("evaluate"): evaluate_dir}
    publish.run(recipe, "", out, step_inputs(recipe, paths))
    card = (out / "README.md").read_text()
    assert "## Evaluation\n\nFrom ftmerge's evaluate stage" in card and table.strip() in card
    assert "# Evaluation of" not in card and "![evaluation chart](evaluation.png)" in card
    assert (out / "evaluation.png").read_bytes() == b"\x89PNG chart"


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_card_usage_code_runs_on_the_folder(published, capsys):
    """The card's own instructions, with the repo id pointing at the local folder: the merged model loads with
    transformers and generates; an adapter loads from its subfolder with PEFT."""
    card = (published["folder"] / "README.md").read_text()
    merged_code, adapter_code = python_blocks(card)
    exec(merged_code.replace(f'"{REPO_ID}"', repr(str(published["folder"]))), {})
    assert capsys.readouterr().out.strip()
    namespace = {}
    exec(adapter_code.replace(f'"{REPO_ID}"', repr(str(published["folder"]))), namespace)
    assert "default" in namespace["model"].peft_config


def test_card_front_matter_license_and_evaluation(tmp_path):
    """Hub ids become base_model; the target's license is read from its card; the evaluation table is included."""
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    (target_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# target\n")
    recipe = Recipe.model_validate(
        {
            "name": "card",
            "base_model": "Qwen/Qwen2-7B",
            "target_model": "Qwen/Qwen2-7B-Instruct",
            "publish": {"repo_id": REPO_ID, "what": "merged"},
        }
    )
    lineage = {
        "base": "Qwen/Qwen2-7B",
        "target": "Qwen/Qwen2-7B-Instruct",
        "engine": "fused",
        "mergekit_config": {"merge_method": "ties"},
        "versions": {"mergekit": "0.1.5"},
        "adapters": [
            {"name": "chat", "dataset": "org/chat-data", "sha256": "ab" * 32, "train": "r=64"},
            {"name": "math", "dataset": None, "sha256": "cd" * 32, "train": ""},
        ],
    }
    manifests = {
        "chat": {"kind": "trained"},
        "math": {
            "kind": "extracted",
            "extraction": {"model": "org/math-ft", "rank": 32, "reconstruction_error_max": 0.125},
        },
    }
    table = "| model | chat (fine-tune) |\n|---|---:|\n| merged | **1.234** |\n"
    release = Release(REPO_ID, "merged", recipe.name, recipe.base_model, recipe.target_model)
    card = model_card(
        release, lineage, "merge_method: ties\n", manifests, table, find_license(target_dir, recipe.target_model)
    )
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == ["Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-7B"]
    assert meta["base_model_relation"] == "merge"
    assert "| chat | trained | dataset `org/chat-data` |" in card
    assert (
        "| math | extracted | extracted from `org/math-ft` at rank 32 (max relative reconstruction error 0.125) |"
        in card
    )
    assert "## Evaluation" in card and table.strip() in card
    assert find_license(tmp_path / "no-card", "./not-a-hub-id") is None
    assert "transfer to the target" not in card, "no evaluation of the transfer, no column"
    transfer = {
        "chat": {"metric": "exact_match", "trained": 0.9, "adapted": 0.72, "transfer": 0.8},
        "math": {"metric": "loss", "gain_on_base": 0.5, "gain_on_target": 0.25, "transfer": 0.5},
    }
    card = model_card(release, lineage, "merge_method: ties\n", manifests, table, None, transfer=transfer)
    assert "| transfer to the target (its skill there / on the base) |" in card
    assert "| r=64 | 0.80× (72% on the target / 90% on the base) |" in card
    assert "| – | 0.50× (loss removed: 0.250 on the target / 0.500 on the base) |" in card


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub as if online (conftest sets HF_HUB_OFFLINE); Xet off, since hf_xet uploads through its own
    Rust HTTP client, outside the transport this test replaces: the LFS protocol is exercised instead."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def test_missing_token_fails_before_any_work(published, online, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    fresh = tmp_path / "fresh-run"
    code = run_pipeline([str(published["recipe"]), "--set", "publish.dry_run=false", "--set", f"output_dir={fresh}"])
    assert code == 2
    assert "publish: no Hugging Face token" in capsys.readouterr().err
    assert not fresh.exists()  # apply and merge did not start


def test_offline_fails_before_any_work(published, tmp_path, capsys):
    fresh = tmp_path / "fresh-run"
    code = run_pipeline([str(published["recipe"]), "--set", "publish.dry_run=false", "--set", f"output_dir={fresh}"])
    assert code == 2 and "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not fresh.exists()


class FakeHub:
    """Answers the endpoints create_repo and upload_folder use, and records every request."""

    def __init__(self):
        self.requests: list[httpx.Request] = []
        self.uploaded: dict[str, bytes] = {}  # LFS object id → bytes PUT to storage

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.url.host == "storage.invalid":
            self.uploaded[path.rsplit("/", 1)[-1]] = request.read()
            return httpx.Response(200)
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": f"https://huggingface.co/{REPO_ID}", "name": REPO_ID})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={})
        if path == f"/api/models/{REPO_ID}/preupload/main":
            files = json.loads(request.content)["files"]
            return httpx.Response(
                200,
                json={
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]
                },
            )
        if path == f"/{REPO_ID}.git/info/lfs/objects/batch":
            objects = json.loads(request.content)["objects"]
            return httpx.Response(
                200,
                json={
                    "transfer": "basic",
                    "objects": [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "actions": {"upload": {"href": f"https://storage.invalid/{o['oid']}"}},
                        }
                        for o in objects
                    ],
                },
            )
        if path == f"/api/models/{REPO_ID}/commit/main":
            return httpx.Response(
                200, json={"commitUrl": f"https://huggingface.co/{REPO_ID}/commit/0123abcd", "commitOid": "0123abcd"}
            )
        return httpx.Response(404, json={"error": f"not part of the fake Hub: {request.method} {path}"})

    def commit_lines(self) -> list[dict]:
        commit = next(r for r in self.requests if r.url.path.endswith("/commit/main"))
        return [json.loads(line) for line in commit.content.decode().splitlines()]


@pytest.fixture
def fake_hub(online):
    with hub_answered_by(FakeHub()) as hub:
        yield hub


def test_upload_sends_the_folder_and_never_shows_the_token(published, fake_hub, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    code = run_pipeline([str(published["recipe"]), "--stage", "publish", "--set", "publish.dry_run=false"])
    assert code == 0
    create = next(r for r in fake_hub.requests if r.url.path == "/api/repos/create")
    assert json.loads(create.content) == {
        "name": "tiny-merge",
        "organization": "someone",
        "visibility": "private",
        "type": "model",
    }
    hub_requests = [r for r in fake_hub.requests if r.url.host == "huggingface.co" and "agent" not in r.url.path]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in hub_requests)

    folder = published["folder"]
    lines = fake_hub.commit_lines()
    inline = {
        line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
    }
    large = {line["value"]["path"]: line["value"]["oid"] for line in lines if line["key"] == "lfsFile"}
    assert sorted([*inline, *large]) == published_files(folder)
    assert sorted(large) == [p for p in published_files(folder) if p.endswith(".safetensors")]
    assert inline["README.md"] == (folder / "README.md").read_bytes()
    for path, oid in large.items():  # every weight file went to LFS storage with its own bytes
        assert hashlib.sha256((folder / path).read_bytes()).hexdigest() == oid
        assert fake_hub.uploaded[oid] == (folder / path).read_bytes()

    summary = json.loads((published["run"] / "state" / "publish.json").read_text())["summary"]
    assert summary["commit_url"].endswith("/commit/0123abcd") and summary["dry_run"] is False
    captured = capsys.readouterr()
    assert f"note: publish: uploaded {len(published_files(folder))} files to" in captured.out  # on the screen
    assert TOKEN not in caplog.text and TOKEN not in captured.out + captured.err
    written = [p for p in published["root"].rglob("*") if p.is_file()]
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]
