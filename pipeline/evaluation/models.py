"""The models of a lineage, loaded one at a time: base, target, each adapted model, the merged model.

An adapted model is read from `apply/<adapter>/` when apply saved it; otherwise it is the target with the archived
adapter merged in by PEFT (`merge_and_unload`, equal to what apply writes), still one model in memory.
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.merging.fused import FusedSources


@dataclass(frozen=True)
class InMemoryMerge:
    """A merge computed into the loaded target by the fused engine: a mergekit config over the sources' base, target
    and adapted models."""

    config: dict
    sources: FusedSources
    device: str = "auto"


@dataclass(frozen=True)
class ModelSpec:
    """One row of the report. `adapter` is set when the model is computed as `path` + that archived adapter, `merge`
    when it is `path` (the target) with that merge written in. `identity` keys its cached scores (None: no cache)."""

    label: str
    role: str
    path: Path
    adapter: Path | None = None
    merge: InMemoryMerge | None = None
    identity: str | None = None


def torch_dtype(name: str) -> torch.dtype | str:
    """A dtype setting for `from_pretrained`: `auto` keeps the stored dtype."""
    return "auto" if name == "auto" else getattr(torch, name)


def evaluation_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the GPU computes it natively (compute capability 8+), fp16 on older GPUs (a T4 or V100
    would emulate bf16, several times slower), bf16 on CPU."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def quantization(load_in_4bit: bool, compute_dtype: torch.dtype, device: torch.device) -> dict:
    """`from_pretrained` arguments for NF4 weights (a 7B in 16 bits, 15 GB, does not fit a T4's 15 GB)."""
    if not load_in_4bit:
        return {}
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "evaluate.load_in_4bit: true needs a CUDA GPU and bitsandbytes (`pip install "
            "bitsandbytes`); set it to false to evaluate in 16 bits"
        )
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    }


def load_causal_lm(
    spec: ModelSpec,
    *,
    dtype: str,
    device: torch.device,
    trust_remote_code: bool = False,
    adapter_dtype: str = "auto",
    load_in_4bit: bool = False,
):
    """The model of `spec` in eval mode on `device`, in `evaluation_dtype(dtype)` (NF4 weights computing in it
    with `load_in_4bit`). With an adapter, the target is loaded in the apply dtype and the LoRA merged in by PEFT,
    exactly as apply would write it, then cast to the evaluation dtype (in 4 bits PEFT merges into the quantized
    weights, so the adapted model is rounded as the others are)."""
    from transformers import AutoModelForCausalLM

    compute_dtype = evaluation_dtype(dtype, device)
    load_dtype = torch_dtype(adapter_dtype) if spec.adapter and not load_in_4bit else compute_dtype
    # On a GPU, straight there: a 7B in bf16 staged in CPU RAM first (15 GB) does not fit a Colab runtime's.
    placement = {} if device.type == "cpu" else {"device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(
        spec.path,
        dtype=load_dtype,
        use_safetensors=True,  # never a pickle: unpickling runs whatever code the file holds
        trust_remote_code=trust_remote_code,
        **placement,
        **quantization(load_in_4bit, compute_dtype, device),
    )
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(spec.adapter)).merge_and_unload()
        cast_parameters(model, compute_dtype)
    # 4-bit weights are placed by device_map and cannot be moved (bitsandbytes).
    return (model if load_in_4bit else model.to(device)).eval()


def cast_parameters(model, dtype: torch.dtype) -> None:
    """Cast weights only: `model.to(dtype)` would also round buffers transformers keeps in float32 (the rotary
    frequencies), and the model would no longer equal the same weights loaded with `from_pretrained(dtype=...)`."""
    for parameter in model.parameters():
        if parameter.dtype != dtype and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)


def release(device: torch.device) -> None:
    """Return a freed model's memory before the next one is loaded (models hold reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
