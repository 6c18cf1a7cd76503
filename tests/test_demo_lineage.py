"""The demo lineage shows the method: the target knows its retention skill and not the fine-tunes' skills, and each
adapted model (target + the LoRA the real train stage trains on the base, as recipes/tiny_cpu.yaml says) knows its
own skill, all on fresh examples that no training set contains."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import run
from pipeline.data.synthetic import fresh_examples
from pipeline.demo import DEMO_MODELS, DEMO_RECIPE
from pipeline.demo.lineage import build_demo_assets
from pipeline.evaluation.generate import greedy_answers, score_answers

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_SKILLS = ("reverse", "sort")


def exact_match(model_dir: Path, skill: str, n: int = 100) -> float:
    """Greedy answers in the target's chat template, as the evaluate stage scores them."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    conversations = fresh_examples(skill, n, seed=0)
    prompts = [tokenizer.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for c in conversations]
    stop_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    answers = greedy_answers(model, tokenizer, prompts, stop_ids=stop_ids, max_new_tokens=12, batch_size=50,
                             pad_id=tokenizer.pad_token_id)
    return score_answers(answers, [c[1]["content"] for c in conversations]).exact_match


@pytest.mark.slow
def test_target_keeps_copy_and_each_lora_teaches_its_skill(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    models = build_demo_assets(ROOT / DEMO_MODELS)
    stages = [flag for stage in ("prepare", "train", "archive", "apply") for flag in ("--stage", stage)]
    assert run.main([str(DEMO_RECIPE), "--set", f"output_dir={tmp_path / 'run'}", *stages]) == 0

    assert exact_match(models["target"], "copy") >= 0.9
    for skill in FINETUNE_SKILLS:
        assert exact_match(models["target"], skill) <= 0.3, f"the target already knows {skill}"
        assert exact_match(tmp_path / "run" / "apply" / skill, skill) >= 0.8, f"adapted:{skill}"
