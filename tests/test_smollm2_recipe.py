"""recipes/smollm2_135m_cpu.yaml, as a user runs it, on the real model, trimmed to a few steps and samples: every
stage runs on SmolLM2 (Llama), Unsloth's CPU backend training the LoRAs. The full run's numbers are in the
README ("The real model"); here, only that each stage works on this model family."""

import json
from pathlib import Path

import pytest

from pipeline import run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_135m_cpu.yaml"
MODELS = ["target", "merged"]  # the lineage's other rows go through the same code: the full run scores them


@pytest.mark.slow
def test_every_stage_runs_on_the_real_model(smollm2, llama_cpp, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's paths (.cache/smollm2, data_templates/) are relative to the clone
    out = tmp_path / "run"
    overrides = {
        "output_dir": out,
        "train.max_steps": 1,
        "train.save_steps": 1,
        "train.logging_steps": 1,
        "evaluate.models": "[target, merged]",
        "evaluate.max_samples": 4,
        "evaluate.max_new_tokens": 8,
        "evaluate.lm_eval.limit": 4,
        "export.gguf.outtypes": "[bf16]",
        "export.gguf.verify_prompts": 2,
        "export.gguf.verify_max_new_tokens": 12,
    }
    assert run.main([str(RECIPE), *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}"))]) == 0

    def summary(stage: str, item: str = "") -> dict:
        state = json.loads((out / "state" / f"{stage}{'.' + item if item else ''}.json").read_text())
        assert state["status"] == "done", (stage, item)
        return state["summary"]

    for finetune in ("reverse", "numbered"):
        assert summary("train", finetune)["backend"] == "unsloth"  # Unsloth's CPU backend trains Llama
        assert summary("train", finetune)["steps"] == 1
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert report["models"] == MODELS
    assert [s["name"] for s in report["sets"]] == ["reverse", "numbered", "hyphenate"]
    capitals = report["lm_eval"]["results"]
    assert sorted(capitals) == sorted(MODELS) and all("world_capitals" in capitals[m] for m in MODELS)
    exported = summary("export")
    assert exported["tokenizer_pre"] == "smollm" and exported["architecture"] == "LlamaForCausalLM"
    checked = exported["verification"]["files"]["bf16"]  # llama.cpp ran it: transformers' text, and it stops
    assert checked["identical"] + checked["near_tie"] == checked["prompts"] == 2, checked["outcomes"]
    assert checked["stops_at_end_of_turn"]
    assert (out / "export" / "smollm2-135m-cpu-bf16.gguf").stat().st_size > 200_000_000
