"""One LoRA training run: load the base through a backend, train with TRL's SFTTrainer on the prepared splits,
resume from the working directory's last checkpoint, and leave a standard PEFT adapter and metrics.json behind.

Under `torchrun`/`accelerate launch` every process runs this; the Trainer does the DDP, and only the main process
writes the adapter, metrics and log, after which all processes wait for each other before returning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.recipe import EMBEDDING_MODULES, TrainConfig
from pipeline.training import checkpoints, data, environment
from pipeline.training.callbacks import MetricsLog
from pipeline.training.job import TrainingJob
from pipeline.training.untrained import fix_untrained_special_tokens
from pipeline.versions import library_versions

if TYPE_CHECKING:  # torch comes in with the backend
    import torch

ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.jsonl"


@dataclass
class TrainingRun:
    """A trainer ready to train, with what finishing the run needs to know."""

    trainer: Any
    backend: str
    workdir: Path
    log: MetricsLog
    has_eval: bool


def train_lora(job: TrainingJob) -> dict:
    """Train (or finish training) the job's LoRA and write `workdir/adapter/` (its `base_model_name_or_path` set to
    `base_model`), `workdir/metrics.json` and `workdir/log.jsonl`. Returns the metrics."""
    run = build_trainer(job.base_dir, job.prepare_dir, job.workdir, job.config, trust_remote_code=job.trust_remote_code)
    return train_and_save(run, job.base_model)


def build_trainer(
    base_dir: Path, prepare_dir: Path, workdir: Path, config: TrainConfig, *, trust_remote_code: bool = False
) -> TrainingRun:
    """Load the base through the configured backend, add LoRA, and build TRL's SFTTrainer on the prepared splits."""
    workdir = Path(workdir)
    backend = environment.choose_backend(config.backend)
    if backend == "unsloth":
        from pipeline.training import unsloth_backend as backend_module
    else:
        from pipeline.training import transformers_backend as backend_module
    model, tokenizer = backend_module.load_model(base_dir, config, trust_remote_code=trust_remote_code)
    untrained = fix_untrained_special_tokens(model, tokenizer)
    if untrained:
        environment.announce(
            f"{', '.join(untrained)} untrained in the base (all-zero embedding rows): set to the "
            "mean of the trained rows for training, as Unsloth does; the adapter holds no embeddings"
        )
    train_split, eval_split = _splits(prepare_dir, tokenizer, config)

    import trl  # after the backend: Unsloth replaces trl.SFTTrainer when it is imported
    from transformers.trainer_callback import ProgressCallback

    trainer_checkpointing = backend_module.uses_trainer_gradient_checkpointing(config)
    dtype = environment.loaded_dtype(model, environment.weights_dtype(config))
    arguments = trl.SFTConfig(
        **sft_arguments(
            config, workdir, has_eval=eval_split is not None, trainer_checkpointing=trainer_checkpointing, dtype=dtype
        )
    )
    trainer = trl.SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=train_split, eval_dataset=eval_split, args=arguments
    )
    if arguments.fp16:
        environment.fp16_ready(trainer.model)
    log = MetricsLog(
        workdir / LOG_FILE,
        settings={
            "backend": backend,
            "load_in_4bit": getattr(model.config, "quantization_config", None) is not None,
            "dtype": str(dtype).removeprefix("torch."),
            "optim": getattr(arguments.optim, "value", arguments.optim),
            "bf16": arguments.bf16,
            "fp16": arguments.fp16,
            "world_size": arguments.world_size,
            "train_rows": len(train_split),
            "eval_rows": len(eval_split) if eval_split is not None else 0,
        },
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(log)
    return TrainingRun(trainer, backend, workdir, log, eval_split is not None)


def train_and_save(run: TrainingRun, base_model: str) -> dict:
    """Train from the last complete checkpoint (or step 0), evaluate, and write adapter, metrics and log."""
    trainer, workdir = run.trainer, run.workdir
    if trainer.is_world_process_zero():
        for removed in checkpoints.remove_incomplete_checkpoints(workdir):
            environment.announce(f"removed {removed.name}: cut short by the previous run's end")
    trainer.accelerator.wait_for_everyone()
    resume = checkpoints.last_complete_checkpoint(workdir)
    if resume:
        environment.announce(
            f"{run.backend} backend; resuming from step {checkpoints.checkpoint_step(resume)} (the checkpoint a killed "
            f"run left in {workdir})"
        )
    else:
        print(f"train: {run.backend} backend; starting at step 0", flush=True)  # the log only: nothing to act on
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    evaluation = trainer.evaluate() if run.has_eval else {}

    metrics = _metrics(run, result, evaluation, resume)
    if trainer.is_world_process_zero():
        save_adapter(trainer.model, workdir / ADAPTER_DIR, base_model)
        (workdir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        checkpoints.remove_checkpoints(workdir)
        (workdir / "README.md").unlink(missing_ok=True)  # TRL's model card for the checkpoints, now gone
    trainer.accelerator.wait_for_everyone()
    return metrics


def _splits(prepare_dir: Path, tokenizer, config: TrainConfig) -> tuple:
    """(train, eval or None), checked: with response-only loss, every assistant span ends with the end-of-turn."""
    responses_only = config.train_on_responses_only
    splits = [
        data.load_split(prepare_dir, name, responses_only=responses_only, max_seq_length=config.max_seq_length)
        for name in ("train", "eval")
    ]
    if len(splits[0]) == 0:
        raise data.PreparedDataError(f"{Path(prepare_dir) / 'train'}: no rows to train on")
    eot_id = data.end_of_turn_id(prepare_dir, tokenizer)
    if responses_only and eot_id is not None:
        for name, split in zip(("train", "eval"), splits, strict=True):
            data.check_turns_end_trained(split, eot_id, str(Path(prepare_dir) / name), config.max_seq_length)
    return splits[0], (splits[1] if len(splits[1]) else None)


def sft_arguments(
    config: TrainConfig, workdir: Path, *, has_eval: bool, trainer_checkpointing: bool, dtype: torch.dtype | None = None
) -> dict:
    """SFTConfig keyword arguments for a train config, adjusted to what this machine can do; bf16/fp16 follow
    `dtype`, the dtype the model was loaded in (default: the one the config asks for)."""
    evaluate_during = bool(config.eval_steps) and has_eval
    return {
        "output_dir": str(workdir),
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_steps,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "optim": environment.optimizer(config),
        **environment.mixed_precision(dtype or environment.weights_dtype(config)),
        "gradient_checkpointing": trainer_checkpointing,
        "max_length": config.max_seq_length,
        "packing": config.packing,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "eval_strategy": "steps" if evaluate_during else "no",
        "eval_steps": config.eval_steps if evaluate_during else None,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "include_num_input_tokens_seen": "non_padding",
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": "none",
        "disable_tqdm": False,
        "dataset_num_proc": None,
        "dataloader_pin_memory": environment.has_gpu(),
        # Without it accelerate sees no device for DDP on CPU and every torchrun process trains alone (gloo needs it).
        "use_cpu": not environment.has_gpu(),
    }


def _metrics(run: TrainingRun, result, evaluation: dict, resume: Path | None) -> dict:
    """The final numbers: train_loss is the last logged training loss (the mean over the last logging window)."""
    state = run.trainer.state
    losses = [record["loss"] for record in state.log_history if "loss" in record]
    return {
        "train_loss": losses[-1] if losses else None,
        "eval_loss": evaluation.get("eval_loss"),
        "steps": state.global_step,
        "tokens": state.num_input_tokens_seen,
        "seconds": result.metrics.get("train_runtime"),
        "tokens_per_second": run.log.session_tokens_per_second(state),
        "resumed_from_step": checkpoints.checkpoint_step(resume) if resume else None,
        "backend": run.backend,
        "versions": library_versions(),
    }


def save_adapter(model, out_dir: Path, base_model: str) -> None:
    """A standard PEFT adapter naming the real base (never the 4-bit alias a backend loaded), and refused if it
    somehow carries embedding weights, which would overwrite the target's when applied."""
    from safetensors import safe_open

    model.save_pretrained(out_dir)
    config_file = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(adapter_config, indent=2) + "\n")
    with safe_open(out_dir / "adapter_model.safetensors", framework="pt") as weights:
        embedding = [name for name in weights.keys() if any(e in name for e in EMBEDDING_MODULES)]  # noqa: SIM118
    if embedding:
        raise ValueError(
            f"{out_dir}: the adapter holds embedding tensors {embedding[:3]}; LoRA must stay on the "
            "projection layers (train.lora.target_modules)"
        )
