"""The models of a lineage, loaded one at a time: base, target, each adapted model, the merged model.

An adapted model is read from `apply/<adapter>/` when apply saved it; otherwise it is the target with the archived
adapter merged in by PEFT (`merge_and_unload`, equal to what apply writes), still one model in memory.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelSpec:
    """One row of the report. `adapter` is set when the model is computed as `path` + that archived adapter."""

    label: str
    role: str
    path: Path
    adapter: Path | None = None


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "target" else getattr(torch, name)


def load_causal_lm(spec: ModelSpec, *, dtype: str, device: torch.device, trust_remote_code: bool = False,
                   adapter_dtype: str = "bfloat16"):
    """The model of `spec` in eval mode on `device`. With an adapter, the target is loaded in the apply dtype and
    the LoRA merged in by PEFT, exactly as apply would write it, then cast to the evaluation dtype."""
    from transformers import AutoModelForCausalLM

    load_dtype = torch_dtype(adapter_dtype) if spec.adapter else torch_dtype(dtype)
    # On a GPU, straight there: a 7B in bf16 staged in CPU RAM first (15 GB) does not fit a Colab runtime's.
    placement = {} if device.type == "cpu" else {"device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=load_dtype, trust_remote_code=trust_remote_code,
                                                 **placement)
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(spec.adapter)).merge_and_unload()
        cast_parameters(model, torch_dtype(dtype))
    return model.to(device).eval()


def cast_parameters(model, dtype: torch.dtype | str) -> None:
    """Cast weights only: `model.to(dtype)` would also round buffers transformers keeps in float32 (the rotary
    frequencies), and the model would no longer equal the same weights loaded with `from_pretrained(dtype=...)`."""
    if dtype == "auto":
        return
    for parameter in model.parameters():
        if parameter.dtype != dtype and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)


def release(device: torch.device) -> None:
    """Return a freed model's memory before the next one is loaded (models hold reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
