"""Training for real with each backend on a tiny model, in a subprocess each: `import unsloth` patches transformers
and TRL for the whole process, so it must not leak into other tests. Also: kill -9 and resume, and 2-process DDP."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.training import TRAIN_SCRIPT, assert_finished_run, environment_for_subprocess, run_training, training_job
from safetensors.torch import load_file

from pipeline.training.callbacks import read_log


def expected_labels(prepared, input_ids: list[int]) -> list[int]:
    from datasets import load_from_disk

    rows = {tuple(r["input_ids"]): r for r in load_from_disk(str(prepared / "train"))}
    row = next(r for key, r in rows.items() if list(key) == input_ids[: len(key)])
    trained = [i if bit else -100 for i, bit in zip(row["input_ids"], row["assistant_masks"], strict=True)]
    return trained + [-100] * (len(input_ids) - len(trained))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["unsloth", "transformers"])
def test_backend_trains_a_peft_adapter_naming_the_real_base(backend, tiny_models, prepared, tmp_path):
    # The recipe's GPU defaults (4-bit, 8-bit Adam): on this CPU-only machine both fall back, and say so.
    result = run_training(
        training_job(
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
    job = training_job(tiny_models["base"], prepared, tmp_path / "work", max_steps=8, save_steps=2)
    uninterrupted = training_job(tiny_models["base"], prepared, tmp_path / "reference", max_steps=8, save_steps=2)
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
    single = run_training(training_job(tiny_models["base"], prepared, tmp_path / "single", max_steps=None, epochs=1))
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
        training_job(tiny_models["base"], prepared, tmp_path / "ddp", max_steps=None, epochs=1), launcher=launcher
    )
    assert single["METRICS"]["steps"] == 8
    assert [rank["METRICS"]["steps"] for rank in ddp["ranks"]] == [4, 4]  # both ranks finished
    metrics = assert_finished_run(tmp_path / "ddp", backend="transformers", steps=4)
    assert metrics["tokens"] == single["METRICS"]["tokens"]  # every row seen once, across both ranks
    log = read_log(tmp_path / "ddp" / "log.jsonl")
    assert [r["event"] for r in log if "event" in r] == ["start"]  # rank 1 wrote nothing
