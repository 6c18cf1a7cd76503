"""What the machine allows: which backend, precision and optimizer a train config can really use here.

Every downgrade (no GPU → no 4-bit, no bf16, no 8-bit Adam) is announced, so a log read later explains why a run
behaved differently on a laptop than on the rented GPU it was written for.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from pipeline import console, distributed
from pipeline.recipe import TrainConfig

if TYPE_CHECKING:  # torch is imported where it is used, so `--status` and `--dry-run` start fast
    import torch

BACKENDS = ("unsloth", "transformers")
GPU_ONLY_OPTIMIZERS = (
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw_bnb_8bit",
    "lion_8bit",
    "paged_lion_8bit",
)
CPU_OPTIMIZER = "adamw_torch"


class TrainingUnavailable(RuntimeError):
    """The chosen backend cannot run on this machine; the message says what to install or change."""


def announce(message: str) -> None:
    """A notice under the train step's line (a fallback the user should know of), from the main process only: under
    torchrun every rank runs the same code."""
    if distributed.is_main_process():
        console.notice(f"train: {message}")


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def is_installed(module: str) -> bool:
    """Without importing it: importing unsloth patches transformers and TRL for the whole process."""
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str) -> str:
    """`auto` → unsloth when it is installed and a GPU is present, else transformers. Raises when the requested
    backend is not installed."""
    if requested == "auto":
        chosen = "unsloth" if is_installed("unsloth") and has_gpu() else "transformers"
        why = (
            "Unsloth installed and a GPU present"
            if chosen == "unsloth"
            else ("no GPU" if not has_gpu() else "Unsloth not installed")
        )
        announce(f"backend auto → {chosen} ({why})")
        return chosen
    if requested not in BACKENDS:
        raise TrainingUnavailable(f"train.backend: unknown backend {requested!r}; expected one of {BACKENDS} or auto")
    check_backend_installed(requested)
    return requested


def check_backend_installed(backend: str) -> None:
    needed = {"unsloth": ["unsloth", "unsloth_zoo", "trl", "peft"], "transformers": ["transformers", "trl", "peft"]}
    missing = [m for m in needed.get(backend, []) if not is_installed(m)]
    if missing:
        raise TrainingUnavailable(
            f"train.backend {backend}: {', '.join(missing)} not installed. Install them (see README, `make setup`) "
            "or set train.backend to " + ("transformers" if backend == "unsloth" else "unsloth")
        )


def load_in_4bit(config: TrainConfig) -> bool:
    """4-bit needs bitsandbytes on CUDA; on CPU the LoRA trains on the unquantized base instead. On a GPU without
    bitsandbytes it is an error: Unsloth would quietly load the base in 16 bits, which a 7B does not fit in on a T4."""
    if config.load_in_4bit and not has_gpu():
        announce("load_in_4bit: true needs a GPU (bitsandbytes); training the unquantized base on CPU instead")
        return False
    if config.load_in_4bit and not is_installed("bitsandbytes"):
        raise TrainingUnavailable(
            "train.load_in_4bit: true needs bitsandbytes (`pip install bitsandbytes`); install "
            "it or set train.load_in_4bit: false"
        )
    return config.load_in_4bit


def weights_dtype(config: TrainConfig) -> torch.dtype:
    """`auto` → bf16 where the GPU supports it, fp16 on older GPUs, float32 on CPU."""
    import torch

    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if not has_gpu():
        return torch.float32
    # Native bf16 only (compute capability 8+): by default torch also says yes for a T4 or V100, which merely
    # emulate it, and Unsloth (which asks for capability 8) would then load float16 under a bf16 Trainer.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def loaded_dtype(model, fallback: torch.dtype) -> torch.dtype:
    """The dtype the backend really loaded the base in, read where Unsloth's trainer checks it against bf16/fp16
    (the config): Unsloth loads float16 when asked for bf16 on a GPU without it, and refuses a bf16 Trainer then."""
    import torch

    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else fallback


def fp16_ready(model) -> None:
    """fp16 autocast scales gradients, and CUDA cannot unscale bfloat16 ones (NotImplementedError at the first
    step); TRL casts a quantized model's LoRA weights to bfloat16, so under fp16 they become float32 instead."""
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.bfloat16:
            parameter.data = parameter.data.float()


def mixed_precision(dtype: torch.dtype) -> dict[str, bool]:
    """bf16/fp16 autocast flags for the Trainer: only on a GPU, matching the weights' dtype."""
    import torch

    if not has_gpu():
        return {"bf16": False, "fp16": False}
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def optimizer(config: TrainConfig) -> str:
    """8-bit and paged optimizers live in bitsandbytes and need CUDA; fall back to torch's AdamW on CPU."""
    if config.optim in GPU_ONLY_OPTIMIZERS and not (has_gpu() and is_installed("bitsandbytes")):
        announce(f"optim {config.optim} needs bitsandbytes on a GPU; using {CPU_OPTIMIZER} instead")
        return CPU_OPTIMIZER
    return config.optim
