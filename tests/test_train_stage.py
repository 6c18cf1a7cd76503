"""The train stage module as the runner sees it: items, paths, what its fingerprint covers, cheap checks, and a run
into the directory the runner gives it."""

import json
import shutil

import pytest
from helpers.prepared import write_prepared
from helpers.recipes import recipe_data

from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import Inputs, StageRef, train


def recipe_for(base, tmp_path, **train_block) -> Recipe:
    """Two fine-tunes on `base` (also the target): `two` overrides the learning rate."""
    dataset = {"path": str(tmp_path / "data.jsonl"), "format": "messages"}
    data = recipe_data(
        {"base": base, "target": base},
        tmp_path / "run",
        name="t",
        finetunes=[
            {"name": "one", "dataset": dataset},
            {"name": "two", "dataset": dataset, "train": {"learning_rate": 1e-4}},
        ],
        train={
            "backend": "transformers",
            "max_seq_length": 128,
            "load_in_4bit": False,
            "max_steps": 3,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 0,
            "save_steps": 2,
            "optim": "adamw_torch",
            "lora": {"r": 8, "alpha": 16},
            **train_block,
        },
    )
    return Recipe.model_validate(data)


def test_items_paths_and_dependencies(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["base"], tmp_path)
    assert train.STAGE.items(recipe) == ["one", "two"]
    assert train.STAGE.output_path(recipe, "two") == tmp_path / "run" / "train" / "two"
    assert train.STAGE.depends_on(recipe, "one") == [StageRef("prepare", "one")]
    assert train.STAGE.resumable and not train.STAGE.write_once


def test_config_covers_the_effective_train_block_and_the_base(tiny_models, tmp_path):
    base = shutil.copytree(tiny_models["base"], tmp_path / "base")
    recipe = recipe_for(base, tmp_path)
    one, two = train.config(recipe, "one"), train.config(recipe, "two")
    assert one["train"]["learning_rate"] == 2e-4 and two["train"]["learning_rate"] == 1e-4
    assert one["base_model_fingerprint"] == two["base_model_fingerprint"]
    (base / "config.json").write_text((base / "config.json").read_text().replace('"hidden_act"', '"hidden_act" '))
    assert train.config(recipe, "one")["base_model_fingerprint"] != one["base_model_fingerprint"]


def test_check_names_a_missing_base_model(tmp_path):
    recipe = recipe_for(tmp_path / "no-such-model", tmp_path)
    with pytest.raises(RecipeError, match="base_model: local model directory not found"):
        train.check(recipe, "one")


@pytest.mark.slow
def test_run_writes_adapter_metrics_and_log_into_out(tiny_models, tiny_tokenizer_dir, tmp_path):
    recipe = recipe_for(tiny_models["base"], tmp_path)
    prepared = tmp_path / "prepare" / "one"
    prepared.mkdir(parents=True)
    write_prepared(prepared, tiny_tokenizer_dir)
    out = tmp_path / "run" / "train" / "one.partial"
    out.mkdir(parents=True)
    summary = train.run(recipe, "one", out, Inputs({StageRef("prepare", "one"): prepared}))
    assert summary["steps"] == 3 and summary["backend"] == "transformers" and summary["eval_loss"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.jsonl", "metrics.json"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_models["base"])
