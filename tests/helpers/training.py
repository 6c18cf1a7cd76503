"""Training for real in a subprocess (`import unsloth` patches transformers and TRL for the whole process, so it
must not leak into the tests' process), and what a finished run must leave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from pipeline.recipe import TrainConfig
from pipeline.training.callbacks import read_log

REAL_BASE = "example-org/tiny-base"  # what a recipe names; the adapter must say this, not the local path
TRAIN_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
from transformers import TrainerCallback
from pipeline.recipe import TrainConfig
from pipeline.training.trainer import build_trainer, train_and_save

spec = json.loads(sys.argv[1])
run = build_trainer(Path(spec["base"]), Path(spec["prepared"]), Path(spec["workdir"]),
                    TrainConfig.model_validate(spec["config"]))

class SlowSteps(TrainerCallback):
    # Only for the kill test: slow each step so the kill lands between two checkpoints.
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(spec["step_delay"])

if spec.get("step_delay"):
    run.trainer.add_callback(SlowSteps())
# Each rank reports in a file of its own: ranks sharing one stdout interleave their writes.
report = {}
if run.trainer.is_world_process_zero():
    dataset = run.trainer.train_dataset
    batch = run.trainer.data_collator([dataset[i] for i in range(2)])
    report["LABELS"] = {"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()}
report["METRICS"] = train_and_save(run, spec["base_model"])
written = Path(spec["reports"]) / f"rank{os.environ.get('RANK', '0')}.json"
written.with_suffix(".tmp").write_text(json.dumps(report))
written.with_suffix(".tmp").rename(written)
"""


def tiny_config(**overrides) -> TrainConfig:
    """A few CPU steps of LoRA r=8 with the transformers backend; `overrides` replace keys."""
    values = {
        "backend": "transformers",
        "max_seq_length": 128,
        "load_in_4bit": False,
        "max_steps": 4,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 0,
        "learning_rate": 1e-3,
        "save_steps": 2,
        "logging_steps": 1,
        "optim": "adamw_torch",
        "gradient_checkpointing": False,
        "lora": {"r": 8, "alpha": 16},
    }
    return TrainConfig.model_validate({**values, **overrides})


def training_job(base, prepared, workdir, **config) -> dict:
    """What TRAIN_SCRIPT reads: the base to train on, prepared data, where to work, a tiny_config."""
    return {
        "base": str(base),
        "prepared": str(prepared),
        "workdir": str(workdir),
        "base_model": REAL_BASE,
        "config": tiny_config(**config).model_dump(),
    }


def environment_for_subprocess() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_training(job: dict, *, launcher: list[str] = (sys.executable,), timeout: float = 240) -> dict:
    """Rank 0's report (LABELS, METRICS), every rank's report under "ranks", and the processes' stdout."""
    reports = Path(tempfile.mkdtemp(prefix="train-reports-"))
    try:
        completed = subprocess.run(
            [*launcher, "-c", TRAIN_SCRIPT, json.dumps({**job, "reports": str(reports)})],
            capture_output=True,
            text=True,
            env=environment_for_subprocess(),
            timeout=timeout,
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
        ranks = [json.loads(path.read_text()) for path in sorted(reports.glob("rank*.json"))]
    finally:
        shutil.rmtree(reports)
    return {**ranks[0], "ranks": ranks, "stdout": completed.stdout}


def assert_finished_run(workdir, *, backend: str, steps: int) -> dict:
    """What a finished run leaves: a LoRA adapter naming the real base, metrics, a log; no checkpoints."""
    adapter = workdir / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == REAL_BASE
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    weights = load_file(adapter / "adapter_model.safetensors")
    assert not [name for name in weights if "embed_tokens" in name or "lm_head" in name]
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert len(lora_b) == 2 * 7 and all(t.abs().sum() > 0 for t in lora_b)  # trained (B starts at zero)
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved["backend"] == backend and saved["steps"] == steps and saved["tokens"] > 0
    assert saved["train_loss"] > 0 and saved["eval_loss"] > 0 and saved["tokens_per_second"] > 0
    assert not list(workdir.glob("checkpoint-*"))
    log = read_log(workdir / "log.jsonl")
    losses = [r for r in log if "loss" in r]
    assert losses and all(r["tokens_per_second"] > 0 for r in losses[1:])
    assert [r for r in log if "eval_loss" in r]
    start = log[0]
    assert start["event"] == "start" and start["backend"] == backend and start["load_in_4bit"] is False
    # Unsloth's SFTConfig turns adamw_torch into adamw_torch_fused.
    assert start["optim"].startswith("adamw_torch") and start["train_rows"] == 32 and start["eval_rows"] == 8
    return saved
