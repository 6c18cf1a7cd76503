"""Qwen2 base checkpoints carry untrained (all-zero) ChatML rows in embed_tokens and lm_head. On a GPU, Unsloth's
SFTTrainer runs unsloth_zoo's `fix_untrained_tokens`, which raises on data that uses such rows unless embed_tokens
and lm_head are trained (which would make an adapter that overwrites the target's embeddings). The CPU build of
Unsloth skips that check, so the test calls the function itself, in a subprocess (importing Unsloth patches
transformers and TRL for the whole process); then real Unsloth training on such a base, announcing the rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.training import assert_finished_run, environment_for_subprocess, run_training, training_job

from pipeline.demo.tiny import save_model
from pipeline.training.untrained import fix_untrained_special_tokens

CHATML = ("<|im_start|>", "<|im_end|>")
# What Unsloth's SFTTrainer.__init__ runs on a GPU (unsloth/models/rl_replacements.py), on the model as our backend
# gives it to the trainer (LoRA on the projections: embeddings frozen) and the prepared rows.
UNSLOTH_CHECK = r"""
import json, sys
import unsloth  # noqa: F401
from datasets import load_from_disk
from pathlib import Path
from pipeline.recipe import TrainConfig
from pipeline.training import unsloth_backend
from pipeline.training.untrained import fix_untrained_special_tokens
from unsloth_zoo.tokenizer_utils import fix_untrained_tokens

base, prepared, ours = sys.argv[1], sys.argv[2], sys.argv[3] == "fix"
config = TrainConfig.model_validate({"backend": "unsloth", "load_in_4bit": False, "max_seq_length": 128,
                                     "lora": {"r": 8, "alpha": 16}, "gradient_checkpointing": False})
model, tokenizer = unsloth_backend.load_model(Path(base), config, trust_remote_code=False)
if ours:
    fix_untrained_special_tokens(model, tokenizer)
try:
    fix_untrained_tokens(model, tokenizer, load_from_disk(str(Path(prepared) / "train")), [], eps=1e-16)
    print(json.dumps({"raised": None}))
except ValueError as error:
    print(json.dumps({"raised": str(error)}))
"""


@pytest.fixture(scope="module")
def base_with_untrained_chatml(tmp_path_factory, tiny_models, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype="auto")
    ids = AutoTokenizer.from_pretrained(tiny_tokenizer_dir).convert_tokens_to_ids(list(CHATML))
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = 0
        model.get_output_embeddings().weight[ids] = 0
    return save_model(model, tiny_tokenizer_dir, tmp_path_factory.mktemp("untrained_chatml"))


def unsloth_check(base, prepared_dir, mode: str) -> str | None:
    completed = subprocess.run(
        [sys.executable, "-c", UNSLOTH_CHECK, str(base), str(prepared_dir), mode],
        capture_output=True,
        text=True,
        env=environment_for_subprocess(),
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])["raised"]


@pytest.mark.slow
def test_unsloths_gpu_check_raises_on_untrained_chatml_rows_unless_they_are_reset(base_with_untrained_chatml, prepared):
    assert "Untrained tokens" in unsloth_check(base_with_untrained_chatml, prepared, "as-loaded")
    assert unsloth_check(base_with_untrained_chatml, prepared, "fix") is None


def test_untrained_rows_become_the_mean_of_the_trained_ones(base_with_untrained_chatml, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_with_untrained_chatml, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tokenizer.convert_tokens_to_ids(list(CHATML))
    before = model.get_input_embeddings().weight.clone()
    assert fix_untrained_special_tokens(model, tokenizer) == list(CHATML)
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        trained = torch.ones(matrix.shape[0], dtype=torch.bool)
        trained[ids] = False
        assert torch.allclose(matrix[ids], matrix[trained].mean(dim=0).expand(2, -1), atol=1e-6)
    others = [i for i in range(before.shape[0]) if i not in ids]
    assert torch.equal(model.get_input_embeddings().weight[others], before[others])
    assert fix_untrained_special_tokens(model, tokenizer) == [], "nothing left to reset"


@pytest.mark.slow
def test_unsloth_trains_on_a_base_whose_chatml_rows_are_untrained(
    base_with_untrained_chatml,
    prepared,
    tmp_path,
):
    result = run_training(training_job(base_with_untrained_chatml, prepared, tmp_path, backend="unsloth", eval_steps=2))
    assert "untrained in the base" in result["stdout"] and all(token in result["stdout"] for token in CHATML)
    assert_finished_run(tmp_path, backend="unsloth", steps=4)
