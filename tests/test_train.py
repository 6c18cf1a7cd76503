"""The train stage's parts: prepared data as the trainer sees it (exactly which ids are trained), machine-dependent
choices, checkpoints. Training runs with both backends are in test_train_backends.py."""

import random

import pytest
import torch
from datasets import Dataset
from helpers.prepared import chatml_row, conversation
from helpers.training import tiny_config
from transformers import AutoTokenizer

from pipeline.recipe import TrainConfig
from pipeline.training import checkpoints, data, environment
from pipeline.training.trainer import build_trainer, sft_arguments


def collated_batch(run):
    return next(iter(run.trainer.get_train_dataloader()))


def test_collated_labels_are_exactly_the_assistant_turns(tiny_models, tiny_tokenizer_dir, prepared, tmp_path):
    run = build_trainer(tiny_models["base"], prepared, tmp_path, tiny_config())
    batch = collated_batch(run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    by_ids = {tuple(row["input_ids"]): row for row in Dataset.load_from_disk(str(prepared / "train"))}
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        length = int(attention.sum())
        row = by_ids[tuple(ids[:length].tolist())]
        expected = [i if bit else -100 for i, bit in zip(row["input_ids"], row["assistant_masks"], strict=True)]
        assert labels[:length].tolist() == expected
        assert (labels[length:] == -100).all()
        # The same, spelled out: both answers and their <|im_end|> are trained, nothing else (no system, user, role
        # headers, nor the newline after <|im_end|>).
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        trained = tokenizer.decode([i for i in labels.tolist() if i != -100])
        assert trained == "".join(f"{answer}<|im_end|>" for answer in answers)


def test_without_responses_only_every_token_is_trained(tiny_models, prepared, tmp_path):
    run = build_trainer(tiny_models["base"], prepared, tmp_path, tiny_config(train_on_responses_only=False))
    batch = collated_batch(run)
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == -100).all()


def test_rows_longer_than_max_seq_length_are_refused(prepared):
    with pytest.raises(data.PreparedDataError, match=r"longer than train.max_seq_length=16 \(first: row 0"):
        data.load_split(prepared, "train", responses_only=True, max_seq_length=16)


def test_an_assistant_span_not_ending_with_end_of_turn_is_refused(tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    row = chatml_row(tokenizer, conversation(random.Random(1)))
    end = max(i for i, bit in enumerate(row["assistant_masks"]) if bit)
    row["assistant_masks"][end] = 0  # the last <|im_end|> left out of the loss: the model would never stop
    dataset = Dataset.from_list([row])
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(data.PreparedDataError, match=f"row 0: an assistant span ends at position {end - 1}"):
        data.check_turns_end_trained(dataset, eot, "prepare/x/train", max_seq_length=128)


def test_missing_columns_name_the_split(tmp_path):
    Dataset.from_list([{"text": "hello"}]).save_to_disk(str(tmp_path / "train"))
    with pytest.raises(data.PreparedDataError, match=r"train: columns \['input_ids', 'assistant_masks'\] missing"):
        data.load_split(tmp_path, "train", responses_only=True, max_seq_length=8)


def test_cpu_turns_off_what_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = TrainConfig(load_in_4bit=True, optim="adamw_8bit")
    assert environment.load_in_4bit(config) is False
    assert environment.optimizer(config) == "adamw_torch"
    assert environment.weights_dtype(config) == torch.float32
    assert environment.mixed_precision(torch.bfloat16) == {"bf16": False, "fp16": False}
    assert environment.choose_backend("auto") == "transformers"
    printed = capsys.readouterr().out
    assert "load_in_4bit" in printed and "adamw_8bit" in printed and "auto → transformers (no GPU)" in printed


def fake_gpu(monkeypatch, *, native_bf16: bool, bitsandbytes: bool = True) -> None:
    """No GPU exists here: torch.cuda (and whether bitsandbytes is installed) is mocked to check the settings a GPU
    run would get. Without native bf16 (a T4, a V100) torch still answers yes unless emulation is excluded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation
    )
    installed = environment.is_installed
    monkeypatch.setattr(environment, "is_installed", lambda m: bitsandbytes if m == "bitsandbytes" else installed(m))


def test_gpu_keeps_4bit_and_bf16(monkeypatch):
    fake_gpu(monkeypatch, native_bf16=True)
    config = TrainConfig(load_in_4bit=True)
    assert environment.load_in_4bit(config) is True
    assert environment.weights_dtype(config) == torch.bfloat16
    assert environment.mixed_precision(torch.bfloat16) == {"bf16": True, "fp16": False}
    assert environment.optimizer(config) == "adamw_8bit"


def test_gpu_without_native_bf16_trains_in_fp16(monkeypatch, tmp_path):
    # A T4: torch's emulated bf16 must not count, or Unsloth loads float16 under a bf16 Trainer and refuses it.
    fake_gpu(monkeypatch, native_bf16=False)
    config = tiny_config()
    assert environment.weights_dtype(config) == torch.float16
    arguments = sft_arguments(config, tmp_path, has_eval=False, trainer_checkpointing=False)
    assert (arguments["bf16"], arguments["fp16"]) == (False, True)


def test_mixed_precision_follows_the_dtype_the_model_was_loaded_in(monkeypatch, tmp_path):
    # Asked for bf16 on a GPU without it, Unsloth loads float16; the Trainer must then use fp16.
    fake_gpu(monkeypatch, native_bf16=False)
    config = tiny_config(dtype="bfloat16")
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"dtype": "float16"})()
    dtype = environment.loaded_dtype(model, environment.weights_dtype(config))
    assert dtype == torch.float16
    arguments = sft_arguments(config, tmp_path, has_eval=False, trainer_checkpointing=False, dtype=dtype)
    assert (arguments["bf16"], arguments["fp16"]) == (False, True)
    model.config.dtype = None
    assert environment.loaded_dtype(model, torch.bfloat16) == torch.bfloat16


def test_gpu_4bit_without_bitsandbytes_is_an_error(monkeypatch):
    fake_gpu(monkeypatch, native_bf16=True, bitsandbytes=False)
    with pytest.raises(environment.TrainingUnavailable, match="needs bitsandbytes"):
        environment.load_in_4bit(TrainConfig(load_in_4bit=True))
    assert environment.optimizer(TrainConfig(optim="adamw_8bit")) == "adamw_torch"


def test_fp16_turns_bf16_adapter_weights_to_float32():
    # TRL leaves a quantized model's LoRA weights in bf16; CUDA's fp16 GradScaler cannot unscale their gradients.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    environment.fp16_ready(model)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32


def test_sft_arguments_follow_the_train_config(tmp_path):
    config = tiny_config(max_steps=None, epochs=2, eval_steps=3, save_total_limit=5, lr_scheduler="cosine")
    arguments = sft_arguments(config, tmp_path, has_eval=True, trainer_checkpointing=False)
    assert arguments["max_steps"] == -1 and arguments["num_train_epochs"] == 2
    assert arguments["eval_strategy"] == "steps" and arguments["eval_steps"] == 3
    assert arguments["save_steps"] == 2 and arguments["save_total_limit"] == 5
    assert arguments["lr_scheduler_type"] == "cosine" and arguments["max_length"] == 128
    assert sft_arguments(config, tmp_path, has_eval=False, trainer_checkpointing=False)["eval_strategy"] == "no"


def test_resume_takes_the_last_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # cut short by a kill
    assert checkpoints.last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert [p.name for p in checkpoints.remove_incomplete_checkpoints(tmp_path)] == ["checkpoint-6"]
    assert [p.name for p in checkpoints.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


def test_the_training_child_receives_the_job_train_lora_takes(tmp_path):
    """The child process rebuilds the job from JSON: every field comes back equal, the train block included."""
    import json

    from pipeline.training.job import TrainingJob

    job = TrainingJob(
        tmp_path / "base",
        tmp_path / "prepare",
        tmp_path / "work",
        tiny_config(max_steps=3, lora={"r": 4, "alpha": 8}),
        base_model="example-org/tiny-base",
        trust_remote_code=True,
    )
    assert TrainingJob.from_json(json.loads(json.dumps(job.as_json()))) == job
