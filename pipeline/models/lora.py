"""PEFT LoRA adapters read as plain tensors, and the adapted weight computed exactly as PEFT merges it.

An adapter trained on the base is applied to a different model (the target), so only a pure low-rank update of
linear weights can travel: anything that stores or rescales the base's own weights (DoRA, LoRA biases,
modules_to_save, trainable tokens, embedding LoRA) would carry the base into the target, and is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models.safetensors_io import TensorInfo, read_header, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
# Settings that make an adapter more than a low-rank update of linear weights, and why each cannot travel.
REFUSED_SETTINGS = {
    "use_dora": "DoRA rescales each weight column by a magnitude learned against the base's own weights",
    "lora_bias": "LoRA biases replace the layer biases learned with the base",
    "modules_to_save": "modules_to_save stores full copies of base modules, which would overwrite the target's",
    "trainable_token_indices": "trainable tokens store embedding rows of the base",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not a linear-layer update we can map",
    "layer_replication": "layer replication changes the model's layer structure",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens and cannot be merged",
}


class AdapterRefused(ValueError):
    """An adapter that cannot be applied to another model; the message says what it is and why."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear layer, named by the weight it updates in the model. A and B stay in the adapter file
    until `delta` reads them: a 72B model's adapter is gigabytes in float32, and holding it whole would make memory
    grow with the depth of the model instead of staying at the size of one tensor."""

    weight_name: str
    lora_A: TensorInfo
    lora_B: TensorInfo
    scale: float
    fan_in_fan_out: bool

    @property
    def shape(self) -> tuple[int, int]:
        shape = (self.lora_B.shape[0], self.lora_A.shape[1])
        return shape[::-1] if self.fan_in_fan_out else shape

    def factors(self, device: torch.device | str = "cpu") -> LoraFactors:
        """A and B read from the adapter file, in float32 on `device` (PEFT upcasts bf16/fp16 adapters so)."""
        lora_A, lora_B = read_tensor(self.lora_A), read_tensor(self.lora_B)
        return LoraFactors(
            lora_A.to(device, torch.float32), lora_B.to(device, torch.float32), self.scale, self.fan_in_fan_out
        )

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """scale·(B@A) in float32, the same operations in the same order as PEFT's `get_delta_weight`."""
        return self.factors(device).delta()


@dataclass(frozen=True)
class LoraFactors:
    """One module's A and B in memory (small: rank × the layer's sides), so the delta can be computed a block of
    weight rows at a time without reading the adapter again."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    fan_in_fan_out: bool

    def delta(self, rows: slice = slice(None)) -> torch.Tensor:
        """scale·(B@A) for `rows` of the weight: B[rows]@A (A's columns with fan_in_fan_out). For blocks of two
        rows or more MKL computes each element with the same sums as the whole product, so the blocks equal it bit
        for bit (a single row goes through gemv and rounds differently; tests/test_fused_scaling.py checks both)."""
        return self.product(rows) * self.scale

    def product(self, rows: slice = slice(None)) -> torch.Tensor:
        """B@A for `rows` of the weight, before the scale (the fused merge's kernel multiplies by it on the fly)."""
        if self.fan_in_fan_out:
            return (self.lora_B @ self.lora_A[:, rows]).T
        return self.lora_B[rows] @ self.lora_A


def adapted_weight(
    weight: torch.Tensor,
    module: LoraModule,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    keep_on_device: bool = False,
) -> torch.Tensor:
    """target + scale·(B@A), added in float32 and rounded once to `dtype`: PEFT's in-place `weight += delta`.
    Returned on the CPU for writing, or on `device` for a merge that goes on there."""
    result = weight.to(device, torch.float32) + module.delta(device)
    return result.to(dtype) if keep_on_device else result.to("cpu", dtype)


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule]


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json, refused with a reason when it is not a plain LoRA that can move to another model."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG}; expected a PEFT adapter directory")
    config = json.loads(file.read_text())
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterRefused(
            f"{file}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA adapters are a "
            "low-rank update that can be added to another model's weights"
        )
    for key, why in REFUSED_SETTINGS.items():
        if config.get(key):
            raise AdapterRefused(
                f"{file}: {key}={config[key]!r} cannot be applied to a different model: {why}. "
                "Train the adapter without it (plain LoRA on the projection layers)."
            )
    return config


def module_scale(config: dict, module_name: str) -> tuple[int, float]:
    """(rank, scale) of one module: rank_pattern/alpha_pattern matched with PEFT's own rule, alpha/r or alpha/√r."""
    rank, alpha = config["r"], config["lora_alpha"]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern:  # importing peft costs seconds; only needed for patterns
        from peft.utils.other import get_pattern_key

        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), rank)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), alpha)
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_adapter(path: Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter (safetensors only) into per-weight modules with their scales."""
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read, never pickles)")
    try:
        entries = read_header(weights_file)
    except ValueError as error:
        raise AdapterRefused(str(error)) from None
    size = weights_file.stat().st_size
    truncated = next((info.name for info in entries.values() if info.end > size), None)
    if truncated:
        raise AdapterRefused(f"{weights_file}: truncated ({size} bytes) before the data of {truncated}")
    embedding = next((key for key in entries if "lora_embedding" in key), None)
    if embedding:
        raise AdapterRefused(
            f"{weights_file}: {embedding} is an embedding LoRA; it was trained on the base's "
            "embedding table, which the target's (often retrained) embeddings do not match, and "
            "PEFT saves the whole base embedding with it. Keep LoRA on the projection layers."
        )
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in entries.items():
        match = KEY.match(key)
        if match is None:
            raise AdapterRefused(
                f"{weights_file}: {key} is not a LoRA A/B matrix (full weights, biases or DoRA "
                "magnitudes of the base cannot be applied to a different model)"
            )
        pairs.setdefault(match["module"], {})[match["part"]] = info
    modules = {}
    for module_name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterRefused(f"{weights_file}: {module_name} has lora_{''.join(pair)} only; A and B are needed")
        rank, scale = module_scale(config, module_name)
        if pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
            raise AdapterRefused(
                f"{weights_file}: {module_name} has rank {pair['A'].shape[0]} but the config says "
                f"{rank} (r / rank_pattern); the scale would be wrong"
            )
        weight_name = f"{module_name}.weight"
        modules[weight_name] = LoraModule(weight_name, pair["A"], pair["B"], scale, bool(config.get("fan_in_fan_out")))
    if not modules:
        raise AdapterRefused(f"{weights_file}: no LoRA matrices found")
    return LoraAdapter(path, config, modules)
