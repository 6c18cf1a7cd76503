"""Recipes for tests, one family: `recipe_data` holds the keys every test recipe has (a name, the tiny base and
target, where outputs go) and each variant below adds what one kind of test needs. The variants repeat keys rather
than derive from each other, so each reads as the recipe a user would write."""

from __future__ import annotations

from pathlib import Path

import yaml

from helpers.cli import REPO
from pipeline.recipe import Recipe

DEMO_DATA = REPO / "data_templates" / "demo"

SEARCH = {
    "trials": 5,
    "max_samples": 6,
    "metric": "loss",
    "retention_tolerance": 0.5,
    "fallback": "published",
    "space": {"methods": ["ties", "task_arithmetic", "linear"]},
}
RETENTION = {
    "retention": [
        {
            "name": "copy",
            "dataset": {"path": str(DEMO_DATA / "copy.messages.jsonl"), "format": "messages", "max_samples": 8},
        }
    ]
}


# The train block of the tests' pipeline recipes: the Unsloth backend on CPU, a few steps at a high rate.
TINY_TRAIN = {
    "backend": "unsloth",
    "max_seq_length": 64,
    "load_in_4bit": False,
    "lora": {"r": 8, "alpha": 16},
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "warmup_steps": 0,
    "learning_rate": 1e-2,
    "optim": "adamw_torch",
    "logging_steps": 1,
}


def recipe_data(models: dict, output_dir: Path, *, name: str, archive_dir: Path | None = None, **sections) -> dict:
    """A recipe as its YAML reads: `models` is {"base": dir, "target": dir}; `sections` add or replace keys."""
    data = {
        "name": name,
        "output_dir": str(output_dir),
        "base_model": str(models["base"]),
        "target_model": str(models["target"]),
    }
    if archive_dir is not None:
        data["archive_dir"] = str(archive_dir)
    return {**data, **sections}


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def merge_recipe(tiny_models, archive, output_dir, *, finetunes: list[dict] = (), **merge_settings) -> Recipe:
    """apply and merge on CPU over the adapters in `archive`; `merge_settings` go into the merge block."""
    data = recipe_data(
        tiny_models,
        output_dir,
        name="merge-test",
        archive_dir=archive,
        finetunes=list(finetunes),
        apply={"device": "cpu"},
        merge={"device": "cpu", **merge_settings},
    )
    return Recipe.model_validate(data)


def evaluate_recipe(tiny_models, finetune_sets: Path, root: Path, **evaluate_settings) -> Recipe:
    """Two fine-tunes (reverse, sort), a fused merge and an evaluate block scoring them, the demo's copy set and one
    lm-eval task; `evaluate_settings` go into the evaluate block."""
    data = recipe_data(
        tiny_models,
        root / "run",
        name="evaluate-test",
        archive_dir=root / "archive",
        finetunes=[
            {"name": "reverse", "dataset": {"path": str(finetune_sets / "reverse.alpaca.jsonl")}},
            {"name": "sort", "dataset": {"path": str(finetune_sets / "sort.messages.jsonl"), "format": "messages"}},
        ],
        apply={"device": "cpu"},
        merge={"device": "cpu", "engine": "fused"},
        evaluate={
            "device": "cpu",
            "batch_size": 4,
            "generate": True,
            "max_new_tokens": 4,
            "max_samples": 6,
            "retention": [
                {"name": "copy", "dataset": {"path": str(DEMO_DATA / "copy.messages.jsonl"), "format": "messages"}}
            ],
            "lm_eval": {"tasks": ["hellaswag"]},
            **evaluate_settings,
        },
    )
    return Recipe.model_validate(data)


def prepare_recipe_data(tiny_models, directory: Path, dataset: dict, **top) -> dict:
    """One fine-tune named `ft` on `dataset`; `top` adds top-level keys, its `train` goes into the train block."""
    train = {"max_seq_length": 512, **top.pop("train", {})}
    return recipe_data(
        tiny_models, directory / "run", name="t", finetunes=[{"name": "ft", "dataset": dataset}], train=train, **top
    )


def prepare_recipe(tiny_models, directory: Path, dataset: dict, **top) -> Recipe:
    return Recipe.model_validate(prepare_recipe_data(tiny_models, directory, dataset, **top))


def write_pipeline_recipe(directory: Path, models: dict, finetune_sets: Path, **changes) -> Path:
    """directory/recipe.yaml for the whole pipeline through the command line: the demo's two fine-tune sets, a few
    Unsloth steps each, a mergekit merge, evaluate off; `changes` replace top-level keys."""
    sections = {
        "finetunes": [
            {
                "name": "reverse",
                "dataset": {
                    "path": str(finetune_sets / "reverse.alpaca.jsonl"),
                    "format": "alpaca",
                    "max_samples": 64,
                    "eval_size": 8,
                },
            },
            {
                "name": "sort",
                "dataset": {
                    "path": str(finetune_sets / "sort.messages.jsonl"),
                    "format": "messages",
                    "max_samples": 64,
                    "eval_size": 8,
                },
            },
        ],
        "train": {**TINY_TRAIN, "max_steps": 4, "save_steps": 2},
        "apply": {"dtype": "bfloat16", "save": True},
        "merge": {"engine": "mergekit"},
        "evaluate": {"enabled": False},
        **changes,
    }
    data = recipe_data(models, directory / "run", name="e2e", archive_dir=directory / "archive", **sections)
    return write_recipe(directory / "recipe.yaml", data)


def write_search_recipe(
    directory: Path, tiny_models, finetune_sets: Path, search: dict | None = None, **changes
) -> Path:
    """The pipeline recipe with a search (SEARCH unless `search` is given) over a fused merge, judged on the
    fine-tunes' held-out rows and the demo's copy set."""
    evaluate = {"max_samples": 8, "batch_size": 4, **RETENTION}
    return write_pipeline_recipe(
        directory,
        tiny_models,
        finetune_sets,
        merge={"engine": "fused"},
        search=search or SEARCH,
        evaluate=evaluate,
        **changes,
    )
