"""The whole pipeline through the command line produces the evaluation table: this test fails if a change stops
`python -m pipeline.run` from evaluating the lineage and printing the table at the end of the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data_templates" / "demo"


def test_pipeline_run_ends_with_the_evaluation_table(tiny_models, finetune_sets, tmp_path):
    recipe = {
        "name": "evaluate-e2e",
        "output_dir": str(tmp_path / "run"),
        "archive_dir": str(tmp_path / "archive"),
        "base_model": str(tiny_models["base"]),
        "target_model": str(tiny_models["target"]),
        "finetunes": [
            {
                "name": "reverse",
                "dataset": {
                    "path": str(finetune_sets / "reverse.alpaca.jsonl"),
                    "format": "alpaca",
                    "max_samples": 24,
                    "eval_size": 4,
                },
            },
            {
                "name": "sort",
                "dataset": {
                    "path": str(finetune_sets / "sort.messages.jsonl"),
                    "format": "messages",
                    "max_samples": 24,
                    "eval_size": 4,
                },
            },
        ],
        "train": {
            "backend": "transformers",
            "max_seq_length": 64,
            "load_in_4bit": False,
            "lora": {"r": 4, "alpha": 8},
            "max_steps": 2,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 0,
            "optim": "adamw_torch",
            "save_steps": 2,
            "logging_steps": 1,
            "gradient_checkpointing": False,
        },
        "apply": {"save": False},
        "evaluate": {
            "retention": [
                {"name": "copy", "dataset": {"path": str(DEMO_DATA / "copy.messages.jsonl"), "format": "messages"}}
            ],
            "generate": True,
            "max_new_tokens": 4,
            "max_samples": 4,
            "batch_size": 4,
            "device": "cpu",
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "pipeline.run", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    header = "| model | reverse (held-out) | sort (held-out) | copy (retention) |"
    assert header in result.stdout
    lines = result.stdout.splitlines()
    models = ["base", "target", "trained:reverse", "trained:sort", "adapted:reverse", "adapted:sort", "merged"]
    rows = [line.split("|")[1].strip() for line in lines[lines.index(header) + 2 : lines.index(header) + 9]]
    assert rows == models
    evaluated = tmp_path / "run" / "evaluate"
    assert header in (evaluated / "report.md").read_text()
    assert (evaluated / "report.png").is_file()
    report = json.loads((evaluated / "report.json").read_text())
    assert all(report["results"][model]["copy"]["tokens"] > 0 for model in report["models"])
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert any(line.startswith("evaluate ") and "skipped" in line for line in again.stdout.splitlines())
