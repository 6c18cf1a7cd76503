"""Training for real with each backend on a tiny model, in a subprocess each: `import unsloth` patches transformers
and TRL for the whole process, so it must not leak into other tests. Also: kill -9 and resume, and 2-process DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config, write_prepared

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


def spec(base, prepared, workdir, **config) -> dict:
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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_dir):
    return write_prepared(tmp_path_factory.mktemp("prepared"), tiny_tokenizer_dir)


def expected_labels(prepared, input_ids: list[int]) -> list[int]:
    from datasets import load_from_disk

    rows = {tuple(r["input_ids"]): r for r in load_from_disk(str(prepared / "train"))}
    row = next(r for key, r in rows.items() if list(key) == input_ids[: len(key)])
    trained = [i if bit else -100 for i, bit in zip(row["input_ids"], row["assistant_masks"], strict=True)]
    return trained + [-100] * (len(input_ids) - len(trained))


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


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["unsloth", "transformers"])
def test_backend_trains_a_peft_adapter_naming_the_real_base(backend, tiny_models, prepared, tmp_path):
    # The recipe's GPU defaults (4-bit, 8-bit Adam): on this CPU-only machine both fall back, and say so.
    result = run_training(
        spec(
            tiny_models["base"],
            prepared,
            tmp_path,
            backend=backend,
            eval_steps=2,
            load_in_4bit=True,
            optim="adamw_8bit",
        )
    )
    assert "load_in_4bit: true needs a GPU" in result["stdout"] and "using adamw_torch" in result["stdout"]
    assert assert_finished_run(tmp_path, backend=backend, steps=4) == result["METRICS"]
    for ids, labels in zip(result["LABELS"]["input_ids"], result["LABELS"]["labels"], strict=True):
        assert labels == expected_labels(prepared, ids)
    if backend == "unsloth":
        assert "Unsloth" in result["stdout"]
    # The adapter is a standard PEFT adapter: PEFT loads it onto the base and its LoRA changes the outputs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        before = base(tokens).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert not torch.allclose(adapted(tokens).logits, before)


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tiny_models, prepared, tmp_path):
    job = spec(tiny_models["base"], prepared, tmp_path / "work", max_steps=8, save_steps=2)
    uninterrupted = spec(tiny_models["base"], prepared, tmp_path / "reference", max_steps=8, save_steps=2)
    job_with_delay = json.dumps({**job, "step_delay": 0.3, "reports": str(tmp_path)})
    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, job_with_delay],
        env=environment_for_subprocess(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "work" / "checkpoint-2" / "trainer_state.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint-2 before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in (tmp_path / "work").glob("checkpoint-*"))
    assert killed_at < 8 and not (tmp_path / "work" / "adapter").exists()

    metrics = run_training(job)["METRICS"]
    assert metrics["resumed_from_step"] >= 2
    assert assert_finished_run(tmp_path / "work", backend="transformers", steps=8) == metrics
    log = read_log(tmp_path / "work" / "log.jsonl")
    events = [(r["event"], r["step"]) for r in log if "event" in r]
    assert events == [("start", 0), ("resume", metrics["resumed_from_step"])]
    logged_steps = [r["step"] for r in log if "loss" in r]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == 8  # none lost, none twice

    # Optimizer, scheduler, data order and RNG came back: the result equals a run that was never interrupted.
    run_training(uninterrupted)
    resumed = load_file(tmp_path / "work" / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_process_ddp_writes_one_adapter(tiny_models, prepared, tmp_path):
    # 32 rows, batch 4, one epoch: 8 optimizer steps alone, 4 with two data-parallel processes (each sees half).
    single = run_training(spec(tiny_models["base"], prepared, tmp_path / "single", max_steps=None, epochs=1))
    # --standalone: a local rendezvous on a free port, so two suites on one machine never collide.
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--no-python",
        sys.executable,
    ]
    ddp = run_training(
        spec(tiny_models["base"], prepared, tmp_path / "ddp", max_steps=None, epochs=1), launcher=launcher
    )
    assert single["METRICS"]["steps"] == 8
    assert [rank["METRICS"]["steps"] for rank in ddp["ranks"]] == [4, 4]  # both ranks finished
    metrics = assert_finished_run(tmp_path / "ddp", backend="transformers", steps=4)
    assert metrics["tokens"] == single["METRICS"]["tokens"]  # every row seen once, across both ranks
    log = read_log(tmp_path / "ddp" / "log.jsonl")
    assert [r["event"] for r in log if "event" in r] == ["start"]  # rank 1 wrote nothing
