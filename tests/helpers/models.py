"""Real PEFT adapters on the tiny models, and tensor-for-tensor comparison of model directories."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, out_dir, seed=0, scale=0.05, **lora_settings):
    """A real PEFT LoRA on the base with random nonzero A and B, each entry normal times `scale` (a fresh LoRA has
    B = 0 and changes nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = {"r": 8, "lora_alpha": 16, "target_modules": PROJECTIONS, **lora_settings}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(out_dir)
    return out_dir


def load_model_tensors(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, across its shards."""
    tensors = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_state(ours: dict, theirs: dict) -> None:
    """The same tensor names, dtypes and values, bit for bit."""
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), f"{name} differs"


def assert_same_tensors(left: Path, right: Path) -> None:
    """Two model directories hold the same tensors, bit for bit."""
    assert_same_state(load_model_tensors(left), load_model_tensors(right))


def bit_identical(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns, NaN where the other has NaN (NaN payloads aside: torch's own vary)."""
    if left.dtype != right.dtype or left.shape != right.shape:
        return False
    nan = left.isnan()
    if not torch.equal(nan, right.isnan()):
        return False
    bits = {2: torch.int16, 4: torch.int32}[left.element_size()]
    return torch.equal(left.view(bits)[~nan], right.view(bits)[~nan])


def layer_tensors(tensors: dict, layer: int) -> dict:
    prefix = f"model.layers.{layer}."
    return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
