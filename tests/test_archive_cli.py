"""`python -m pipeline.archive add`: a real PEFT LoRA trained elsewhere gets in with a manifest; pickles, other PEFT
methods, adapters of another architecture and name conflicts are refused with the reason."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from helpers.models import make_adapter

from pipeline.archive.__main__ import main as archive_cli
from pipeline.archive.store import archived_adapters, verify_adapter
from pipeline.demo.tiny import make_tiny_model
from pipeline.fingerprint import sha256_file
from pipeline.models.lora import load_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_models, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("add")
    small_base = make_tiny_model(root / "small_base", tiny_tokenizer_dir, hidden_size=32, seed=3)
    return {
        "root": root,
        "one": make_adapter(tiny_models["base"], root / "one", seed=0),
        "two": make_adapter(tiny_models["base"], root / "two", seed=1),
        "other_size": make_adapter(small_base, root / "other_size", seed=0),
    }


def add(archive, path, name, base, *extra) -> int:
    return archive_cli(["add", str(archive), str(path), "--name", name, "--base", str(base), *extra])


def test_add_archives_an_imported_adapter(adapters, tiny_models, tmp_path, capsys):
    archive = tmp_path / "archive"
    assert add(archive, adapters["one"], "one", tiny_models["base"], "--target", str(tiny_models["target"])) == 0
    assert "archived one" in capsys.readouterr().out
    manifest = verify_adapter(archive / "one")
    assert manifest["kind"] == "imported" and manifest["base_model"] == str(tiny_models["base"])
    assert manifest["target_model"] == str(tiny_models["target"])
    assert manifest["base_config"]["hidden_size"] == 64 and manifest["lora_modules"] == 14
    assert manifest["source"]["path"] == str(adapters["one"].resolve())
    # The weights are the source's bytes; the config points at the base as given.
    assert sha256_file(archive / "one" / "adapter_model.safetensors") == sha256_file(
        adapters["one"] / "adapter_model.safetensors"
    )
    config = json.loads((archive / "one" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_models["base"])
    assert load_adapter(archive / "one").modules.keys() == load_adapter(adapters["one"]).modules.keys()
    assert list(archived_adapters(archive)) == ["one"]
    assert archive_cli(["verify", str(archive)]) == 0


def test_same_name_same_content_is_a_no_op_different_content_an_error(adapters, tiny_models, tmp_path, capsys):
    archive = tmp_path / "archive"
    assert add(archive, adapters["one"], "one", tiny_models["base"]) == 0
    before = (archive / "one" / "manifest.json").read_bytes()
    assert add(archive, adapters["one"], "one", tiny_models["base"]) == 0
    assert "already archived with identical files" in capsys.readouterr().out
    assert add(archive, adapters["two"], "one", tiny_models["base"]) == 1
    assert "already holds a different adapter named one" in capsys.readouterr().err
    assert (archive / "one" / "manifest.json").read_bytes() == before
    # no temporary directory left behind; the writer's lock file (pipeline.locking) stays
    assert sorted(p.name for p in archive.iterdir()) == [".one.lock", "one"]


def test_pickle_adapters_are_refused(adapters, tiny_models, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["base"]), adapters["one"])
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert add(tmp_path / "archive", tmp_path / "pickled", "pickled", tiny_models["base"]) == 2
    error = capsys.readouterr().err
    assert "adapter_model.bin" in error and "arbitrary code" in error and "safe_serialization=True" in error


def test_other_peft_methods_are_refused(tiny_models, tmp_path, capsys):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    get_peft_model(
        model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ).save_pretrained(tmp_path / "ia3")
    assert add(tmp_path / "archive", tmp_path / "ia3", "ia3", tiny_models["base"]) == 2
    assert "peft_type 'IA3' is not LoRA" in capsys.readouterr().err


def test_adapter_of_another_size_is_refused_naming_tensor_and_shapes(adapters, tiny_models, tmp_path, capsys):
    assert add(tmp_path / "archive", adapters["other_size"], "small", tiny_models["base"]) == 2
    error = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj.weight is [64, 192] in the base" in error
    assert "the LoRA update is [32, 96]" in error
    assert not (tmp_path / "archive").exists() or not any((tmp_path / "archive").iterdir())


def test_bad_name_is_refused(adapters, tiny_models, tmp_path, capsys):
    assert add(tmp_path / "archive", adapters["one"], "Bad Name", tiny_models["base"]) == 2
    assert "adapter name 'Bad Name'" in capsys.readouterr().err


def test_a_damaged_manifest_is_named_not_a_traceback(adapters, tiny_models, tmp_path, capsys):
    from pipeline import run

    archive = tmp_path / "archive"
    assert add(archive, adapters["one"], "one", tiny_models["base"]) == 0
    (archive / "broken").mkdir()
    (archive / "broken" / "manifest.json").write_text('{"name": ')  # cut short by a full disk
    capsys.readouterr()
    assert archive_cli(["verify", str(archive)]) == 1
    out = capsys.readouterr()
    assert "ok       one" in out.out and "CORRUPT" in out.out and "broken" in out.err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "r",
                "base_model": str(tiny_models["base"]),
                "target_model": str(tiny_models["target"]),
                "archive_dir": str(archive),
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    assert run.main([str(recipe), "--status"]) == 2
    assert "broken/manifest.json: not an archive manifest" in capsys.readouterr().err


@pytest.fixture
def archived(adapters, tiny_models, tmp_path):
    archive = tmp_path / "archive"
    for name in ("one", "two"):
        assert add(archive, adapters[name], name, tiny_models["base"]) == 0
    return archive


def test_verify_catches_an_edited_manifest_and_files_it_does_not_list(archived, adapters, capsys):
    """The weights overwritten *and* dropped from manifest.files, or base_model edited: the manifest no longer
    matches its seal. A file the manifest does not list is caught too."""
    manifest_file = archived / "one" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"].pop("adapter_model.safetensors")
    manifest_file.write_text(json.dumps(manifest))
    (archived / "one" / "adapter_model.safetensors").write_bytes(b"other weights")
    edited = json.loads((archived / "two" / "manifest.json").read_text())
    edited["base_model"] = "someone/else"
    (archived / "two" / "manifest.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert archive_cli(["verify", str(archived)]) == 1
    out = capsys.readouterr().out
    assert out.count("CORRUPT") == 2 and "one/manifest.json: edited after the adapter was archived" in out
    assert "two/manifest.json: edited after the adapter was archived" in out


def test_verify_names_a_file_a_sealed_manifest_does_not_list_and_a_stray_folder(archived, capsys):
    (archived / "one" / "notes.txt").write_text("added by hand")
    (archived / "stray").mkdir()
    capsys.readouterr()
    assert archive_cli(["verify", str(archived)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT  archived adapter one: notes.txt is not listed in its manifest" in out
    assert "ok       two" in out and "STRAY    stray" in out


def test_list_flags_a_broken_entry_and_goes_on(archived, capsys):
    (archived / "broken").mkdir()
    (archived / "broken" / "manifest.json").write_text('{"name": ')
    capsys.readouterr()
    assert archive_cli(["list", str(archived)]) == 1
    captured = capsys.readouterr()
    assert "one" in captured.out and "two" in captured.out and "BROKEN" in captured.out
    assert "broken/manifest.json: not an archive manifest" in captured.err


def test_archived_folders_and_files_follow_the_umask_of_a_shared_archive(adapters, tiny_models, tmp_path):
    previous = os.umask(0o022)
    try:
        assert add(tmp_path / "archive", adapters["one"], "one", tiny_models["base"]) == 0
    finally:
        os.umask(previous)
    entry = tmp_path / "archive" / "one"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in entry.iterdir() if not f.name.startswith(".")} == {0o644}
