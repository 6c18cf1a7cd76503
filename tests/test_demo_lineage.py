"""The demo lineage on fresh examples no training set contains: the target does its own skill (copy) and not the
fine-tunes' skills, and each adapted model (target + the LoRA the real train stage trains on the base, as
recipes/tiny_cpu.yaml says) learns its own: the evidence issue's thresholds, asserted as the issue states them."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import run
from pipeline.demo import DEMO_MODELS, DEMO_RECIPE, fresh
from pipeline.demo.lineage import build_demo_assets

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_SKILLS = ("reverse", "sort")


def exact_match(model_dir: Path, skill: str, n: int = 100) -> float:
    """Greedy answers in the target's chat template on fresh examples, as `python -m pipeline.demo.fresh` scores."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return fresh.exact_match(model, tokenizer, skill, n, seed=0)


@pytest.mark.slow
def test_target_keeps_copy_and_each_lora_teaches_its_skill(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    models = build_demo_assets(ROOT / DEMO_MODELS)
    stages = [flag for stage in ("prepare", "train", "archive", "apply") for flag in ("--stage", stage)]
    assert run.main([str(DEMO_RECIPE), "--set", f"output_dir={tmp_path / 'run'}", *stages]) == 0

    # Measured 2026-12-01 (DEMO_VERSION 5, 100 fresh examples, seed 1): target copy 1.00, reverse 0.00, sort 0.03;
    # adapted:reverse 1.00, adapted:sort 1.00.
    assert exact_match(models["target"], "copy") >= 0.9
    for skill in FINETUNE_SKILLS:
        assert exact_match(models["target"], skill) <= 0.3, f"the target already knows {skill}"
        assert exact_match(tmp_path / "run" / "apply" / skill, skill) >= 0.8, f"adapted:{skill}"
