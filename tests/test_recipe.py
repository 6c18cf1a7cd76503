"""The recipe schema: every mistake a user can make in the YAML is named by key and file, with a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.recipe import RecipeError, load_recipe

MINIMAL = {"name": "demo", "base_model": "org/base", "target_model": "org/target"}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as error:
        load_recipe(path, list(overrides))
    return str(error.value)


def test_defaults_follow_the_design(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL))
    assert recipe.output_dir == Path("runs/demo")
    assert recipe.archive_dir == Path("runs/demo/adapters")
    assert recipe.merge.method == "ties" and recipe.merge.parameters is None  # the seed's, per method
    assert recipe.train.lora.target_modules[-1] == "down_proj"
    assert recipe.trust_remote_code is False


def test_unknown_key_names_the_key_the_file_and_a_suggestion(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "train": {"learning_rat": 1e-4}})
    message = error_of(path)
    assert str(path) in message and "train.learning_rat" in message and "did you mean 'learning_rate'" in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "name": "Bad Name", "merge": {"dtyp": "bfloat16"}, "apply": {"dtype": "x"}})
    message = error_of(path)
    assert "3 problems" in message and "name:" in message and "merge.dtyp" in message and "apply.dtype" in message


def test_embeddings_in_target_modules_are_refused_with_the_reason(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "train": {"lora": {"target_modules": ["q_proj", "lm_head"]}}})
    message = error_of(path)
    assert "lm_head" in message and "target" in message and "own embeddings" in message


def test_finetune_overrides_are_validated_and_merged(tmp_path):
    finetune = {"name": "a", "dataset": {"path": "x.jsonl"}, "train": {"lora": {"r": 8}, "max_seq_length": 512}}
    recipe = load_recipe(_write(tmp_path, {**MINIMAL, "finetunes": [finetune]}))
    effective = recipe.train_config("a")
    assert (effective.lora.r, effective.lora.alpha, effective.max_seq_length) == (8, 64, 512)
    bad = {**finetune, "train": {"epoch": 2}}
    message = error_of(_write(tmp_path, {**MINIMAL, "finetunes": [bad]}))
    assert "finetunes.0.train" in message and "epoch" in message


def test_set_overrides_any_key_with_yaml_values(tmp_path):
    finetune = {"name": "a", "dataset": {"path": "x.jsonl"}}
    path = _write(tmp_path, {**MINIMAL, "finetunes": [finetune]})
    overrides = ["train.max_steps=10", "merge.parameters.lambda=0.5", "finetunes.0.dataset.max_samples=5"]
    recipe = load_recipe(path, overrides)
    assert recipe.train.max_steps == 10 and recipe.merge.parameters["lambda"] == 0.5
    assert recipe.finetunes[0].dataset.max_samples == 5
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(path, ["train.max_steps"])
    assert "finetunes.3" in error_of(path, ("finetunes.3.name=x",))


def test_duplicate_finetune_names_and_non_mapping_files(tmp_path):
    twice = [{"name": "a", "dataset": {"path": "x"}}] * 2
    assert "repeated" in error_of(_write(tmp_path, {**MINIMAL, "finetunes": twice}))
    assert "YAML mapping" in error_of(_write(tmp_path, "- a\n- b\n"))
    assert "not valid YAML" in error_of(_write(tmp_path, "a: [\n"))


def test_python_objects_in_yaml_are_not_constructed(tmp_path):
    unsafe = "name: !!python/object/apply:os.system ['echo unsafe']\nbase_model: a/b\ntarget_model: a/c\n"
    path = _write(tmp_path, unsafe)
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_finetune_override_typos_get_a_hint_and_every_problem_is_listed(tmp_path):
    finetunes = [
        {"name": "a", "dataset": {"path": "x.jsonl"}, "train": {"lerning_rate": 1e-4}},
        {"name": "b", "dataset": {"path": "y.jsonl"}, "train": {"lora": {"rr": 8}, "batch_size": "two"}},
    ]
    message = error_of(_write(tmp_path, {**MINIMAL, "finetunes": finetunes}))
    assert "3 problems" in message and "(top level)" not in message
    assert "finetunes.0.train.lerning_rate: unknown key; did you mean 'learning_rate'?" in message
    assert "finetunes.1.train.lora.rr: unknown key; did you mean 'r'?" in message
    assert "finetunes.1.train.batch_size:" in message


def test_finetune_names_cannot_shadow_the_runners_temporary_and_previous_copies(tmp_path):
    finetunes = [
        {"name": "a", "dataset": {"path": "x.jsonl"}},
        {"name": "a.partial", "dataset": {"path": "y"}},
        {"name": "a.old", "dataset": {"path": "z"}},
    ]
    message = error_of(_write(tmp_path, {**MINIMAL, "finetunes": finetunes}))
    assert "finetunes.1.name" in message and "finetunes.2.name" in message and ".partial or .old" in message


def test_home_in_output_and_model_paths_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = load_recipe(_write(tmp_path, {**MINIMAL, "output_dir": "~/runs/demo", "base_model": "~/models/base"}))
    assert recipe.output_dir == tmp_path / "runs" / "demo" and recipe.archive_dir == tmp_path / "runs/demo/adapters"
    assert recipe.base_model == str(tmp_path / "models" / "base") and recipe.target_model == "org/target"
