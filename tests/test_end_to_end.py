"""The whole workflow through the command line, as a user runs it: one recipe, five stages, tiny real models.

Each run is a real `python -m pipeline.run` subprocess (Unsloth on CPU for training, mergekit for the merge); the
checks compare its outputs with what PEFT and `mergekit-yaml` produce from the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import kill_when, rerun_from_copy, run_cli, start_cli
from helpers.models import assert_same_state, assert_same_tensors, load_model_tensors
from helpers.recipes import write_pipeline_recipe

pytestmark = pytest.mark.slow

STEPS = [
    "prepare.reverse",
    "prepare.sort",
    "train.reverse",
    "train.sort",
    "archive.reverse",
    "archive.sort",
    "apply.reverse",
    "apply.sort",
    "merge",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models, finetune_sets):
    directory = tmp_path_factory.mktemp("e2e")
    recipe = write_pipeline_recipe(directory, tiny_models, finetune_sets)
    started = time.time()
    result = run_cli(recipe)
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        "recipe": recipe,
        "dir": directory,
        "output": directory / "run",
        "archive": directory / "archive",
        "stdout": result.stdout,
        "seconds": time.time() - started,
        "models": tiny_models,
    }


def test_run_prints_one_line_per_step_and_the_merged_model(finished_run):
    lines = finished_run["stdout"].splitlines()
    for step in STEPS:
        assert any(line.startswith(step + " ") and " done " in line for line in lines), (step, lines)
    assert f"merged model: {finished_run['output'] / 'merge'}" in lines[-1]
    assert not list(finished_run["output"].rglob("*.partial"))


def test_second_run_does_nothing_and_says_so(finished_run):
    started = time.time()
    result = run_cli(finished_run["recipe"])
    assert result.returncode == 0, result.stderr
    skipped = [line.split()[0] for line in result.stdout.splitlines() if "skipped" in line]
    assert skipped == STEPS
    print(f"second run: {time.time() - started:.1f}s (first: {finished_run['seconds']:.1f}s)")


def test_status_table_lists_every_step_as_done(finished_run):
    result = run_cli(finished_run["recipe"], "--status")
    assert result.returncode == 0
    rows = [line for line in result.stdout.splitlines() if " done " in line]
    assert len(rows) == len(STEPS), result.stdout


def test_adapted_models_equal_peft_merge_and_unload(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for adapter in ("reverse", "sort"):
        target = AutoModelForCausalLM.from_pretrained(finished_run["models"]["target"], dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(target, finished_run["archive"] / adapter).merge_and_unload()
        reference = {name: tensor.contiguous() for name, tensor in merged.state_dict().items()}
        ours = load_model_tensors(finished_run["output"] / "apply" / adapter)
        if "lm_head.weight" not in ours:  # tied embeddings are stored once
            reference.pop("lm_head.weight")
        assert_same_state(ours, reference)
        changed = sum(not torch.equal(ours[n], load_model_tensors(finished_run["models"]["target"])[n]) for n in ours)
        assert changed > 0, "training left every LoRA B at zero: the comparison would prove nothing"


def test_merge_equals_mergekit_yaml_on_the_written_config(finished_run, tmp_path):
    config = finished_run["output"] / "merge" / "mergekit_config.yml"
    mergekit_yaml = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run(
        [str(mergekit_yaml), str(config), str(tmp_path / "out"), "--no-write-model-card"],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert_same_tensors(finished_run["output"] / "merge", tmp_path / "out")


def test_merged_model_keeps_the_target_chat_format_and_generates(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = finished_run["output"] / "merge"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    target_tokenizer = AutoTokenizer.from_pretrained(finished_run["models"]["target"])
    assert tokenizer.chat_template == target_tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    target_generation = json.loads((finished_run["models"]["target"] / "generation_config.json").read_text())
    assert model.generation_config.eos_token_id == target_generation["eos_token_id"]
    eos_ids = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos_ids if isinstance(eos_ids, list) else [eos_ids])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort\nc a b"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


def test_changed_learning_rate_reruns_train_and_downstream_only(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run["output"], copy)
    recipe = finished_run["recipe"]
    common = ["--set", f"output_dir={copy}", "--set", "train.learning_rate=5e-3"]
    refused = run_cli(recipe, *common)
    assert refused.returncode == 2
    assert "archive.reverse" in refused.stderr and "never overwritten" in refused.stderr
    assert "running" not in refused.stdout, "the archive conflict must be found before training starts"
    result = run_cli(recipe, *common, "--set", f"archive_dir={tmp_path / 'archive-v2'}")
    assert result.returncode == 0, result.stderr
    outcome = {
        line.split()[0]: line.split()[1]
        for line in result.stdout.splitlines()
        if line.split()[1:2] in (["done"], ["skipped"])
    }
    assert outcome == {"prepare.reverse": "skipped", "prepare.sort": "skipped", **{s: "done" for s in STEPS[2:]}}


def test_settings_that_cannot_change_a_result_redo_nothing(finished_run):
    """Devices, memory budgets and log/checkpoint cadence are declared result-neutral once, in the schema: changing
    them reruns no step (the merge, the adapted models and the archive are hours of work on a 7B)."""
    neutral = {
        "merge.memory_budget": "2.5",
        "merge.device": "cpu",
        "merge.low_cpu_memory": "true",
        "apply.device": "cpu",
        "train.logging_steps": "3",
        "train.save_steps": "7",
        "train.save_total_limit": "5",
    }
    result = run_cli(finished_run["recipe"], *(f"--set={key}={value}" for key, value in neutral.items()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines() if "skipped" in line] == STEPS


def test_bad_recipes_exit_2_before_any_stage_runs(tiny_models, finetune_sets, tmp_path):
    cases = {
        "unknown key": ({"train": {"learning_rat": 1}}, "did you mean 'learning_rate'"),
        "missing model": ({"base_model": str(tmp_path / "nowhere")}, "base_model: local model directory not found"),
        "missing dataset": (
            {"finetunes": [{"name": "x", "dataset": {"path": str(tmp_path / "none.jsonl")}}]},
            "none.jsonl",
        ),
    }
    for case, (change, expected) in cases.items():
        directory = tmp_path / case.replace(" ", "-")
        directory.mkdir()
        result = run_cli(write_pipeline_recipe(directory, tiny_models, finetune_sets, **change))
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert expected in result.stderr, (case, result.stderr)
        assert not (directory / "run").exists(), f"{case}: something was written before the error"


def test_kill_during_training_resumes_from_the_last_checkpoint(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run["output"] / "prepare", copy / "prepare")
    shutil.copytree(finished_run["output"] / "state", copy / "state")
    args = [
        finished_run["recipe"],
        "--stage",
        "train",
        "--set",
        f"output_dir={copy}",
        "--set",
        "train.max_steps=40",
        "--set",
        "train.save_steps=4",
    ]
    partial = copy / "train" / "reverse.partial"
    process = start_cli(*args, log=tmp_path / "killed.log")
    kill_when(process, lambda: (partial / "checkpoint-8" / "trainer_state.json").is_file(), tmp_path / "killed.log")
    assert not (copy / "train" / "reverse").exists()
    # Log and checkpoint cadence cannot change the adapter: changed after the kill, training still resumes.
    result = run_cli(*args, "--set", "train.logging_steps=5", "--set", "train.save_steps=10")
    assert result.returncode == 0, result.stdout + result.stderr
    state = yaml.safe_load((copy / "state" / "train.reverse.json").read_text())
    assert state["status"] == "done" and state["summary"]["steps"] == 40
    resumed_from = state["summary"].get("resumed_from_step")
    assert resumed_from is not None and resumed_from >= 8, state["summary"]
    assert f"note: train: unsloth backend; resuming from step {resumed_from}" in result.stdout  # on the screen
    assert not partial.exists()


def test_kill_during_apply_and_merge_never_leaves_a_finished_looking_output(finished_run, tmp_path):
    copy = tmp_path / "run"
    args = rerun_from_copy(finished_run, copy, ("apply", "merge"))
    for kill_after in (1.5, 3.0, 4.5, 6.0):
        process = start_cli(*args, log=tmp_path / f"killed-after-{kill_after}.log")
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
        process.wait()
        outputs = [copy / "merge", copy / "apply" / "reverse", copy / "apply" / "sort"]
        for finished in (output for output in outputs if output.exists()):
            reference = finished_run["output"] / finished.relative_to(copy)
            assert_same_tensors(finished, reference)
    result = run_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_tensors(copy / "merge", finished_run["output"] / "merge")
    for adapter in ("reverse", "sort"):
        assert_same_tensors(copy / "apply" / adapter, finished_run["output"] / "apply" / adapter)
