"""Adapted models: the target with one LoRA added, streamed tensor by tensor.

The apply stage writes them; the fused merge computes the same tensors on the fly (`adapted_tensor`), so both engines
see identical inputs. Memory holds the tensor being adapted and the one being read ahead, plus the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from pipeline.console import tqdm
from pipeline.models.architecture import ARCHITECTURE_KEYS
from pipeline.models.lora import LoraAdapter, adapted_weight, load_adapter
from pipeline.models.safetensors_io import (
    INDEX_FILE,
    ShardWriter,
    TensorInfo,
    TensorReader,
    copy_tokenizer_files,
    model_tensors,
    read_header,
    shard_files,
    write_config,
    write_index,
)

T = TypeVar("T")
R = TypeVar("R")
# Config keys that must agree between the base an adapter was trained on and the target it is applied to.


class IncompatibleAdapter(ValueError):
    """An adapter whose modules or base do not fit the target; the message names the tensor and both shapes."""


def output_dtype(setting: str, stored: torch.dtype) -> torch.dtype:
    """The dtype an adapted tensor is written in: `apply.dtype`, or the target's stored dtype for `auto` (and
    always for integer tensors)."""
    if setting == "auto" or not stored.is_floating_point:
        return stored
    return getattr(torch, setting)


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no CUDA GPU; use auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def check_architecture(adapter_name: str, base_config: dict | None, target_config: dict, target_name: str) -> None:
    """Raise IncompatibleAdapter at the first architecture setting where the target differs from the adapter's base
    (the manifest's `base_config`): same-shaped tensors do not make the same architecture."""
    for key in ARCHITECTURE_KEYS:
        if base_config and key in base_config and target_config.get(key) != base_config[key]:
            raise IncompatibleAdapter(
                f"adapter {adapter_name}: its base has {key}={base_config[key]!r} but the target {target_name} "
                f"has {target_config.get(key)!r}; a LoRA only applies to a model of the same architecture"
            )


def check_compatibility(
    adapter: LoraAdapter,
    target_tensors: dict[str, TensorInfo],
    target_config: dict,
    base_config: dict | None,
    target_name: str,
) -> None:
    """Raise IncompatibleAdapter at the first module missing from the target or of another shape, or the first
    architecture setting where the target differs from the adapter's base. Reads no weights."""
    check_architecture(adapter.path.name, base_config, target_config, target_name)
    for name, module in adapter.modules.items():
        info = target_tensors.get(name)
        if info is None:
            raise IncompatibleAdapter(
                f"adapter {adapter.path.name}: LoRA module {name} has no tensor in the target {target_name}"
            )
        if info.shape != module.shape:
            raise IncompatibleAdapter(
                f"adapter {adapter.path.name}: {name} is {list(info.shape)} in the target {target_name} but the LoRA "
                f"update is {list(module.shape)}"
            )
        if not info.dtype.is_floating_point:
            raise IncompatibleAdapter(
                f"adapter {adapter.path.name}: {name} is stored as {info.dtype} in the target "
                f"{target_name} (quantized?); apply needs a floating-point target"
            )


def adapted_tensor(
    name: str, tensor: torch.Tensor, adapter: LoraAdapter, dtype_setting: str, device: torch.device
) -> torch.Tensor:
    """One tensor of the adapted model: the target's, plus the LoRA update when the adapter has one for it."""
    dtype = output_dtype(dtype_setting, tensor.dtype)
    module = adapter.modules.get(name)
    if module is None:
        return tensor.to(dtype)
    return adapted_weight(tensor, module, dtype, device)


def read_ahead(read: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
    """Yield each item with `read(item)`, in order, while the next item is read in a background thread (file reads
    release the GIL): reading overlaps computing, and memory holds one read ahead. Apply and the fused merge use it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for item in items:
            future = pool.submit(read, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def apply_adapter(
    adapter_dir: Path,
    target_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    base_config: dict | None = None,
) -> dict:
    """Write target + LoRA into `out_dir`: the target's shard layout and index, its config (dtype updated),
    generation_config and tokenizer files. Everything is checked before the first byte is written."""
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    adapter = load_adapter(adapter_dir)
    tensors = model_tensors(target_dir)
    target_config = json.loads((target_dir / "config.json").read_text())
    check_compatibility(adapter, tensors, target_config, base_config, str(target_dir))
    compute_device = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total_size = {}, 0
    with (
        TensorReader(tensors) as reader,
        tqdm(total=len(tensors), desc=f"apply {adapter.path.name}", unit="tensor", leave=False) as bar,
    ):
        for shard in shard_files(target_dir):
            infos = read_header(target_dir / shard)
            layout = {name: (output_dtype(dtype, info.dtype), info.shape) for name, info in infos.items()}
            writer = ShardWriter(out_dir / shard, layout)
            for name, tensor in read_ahead(reader.read, layout):
                writer.write(name, adapted_tensor(name, tensor, adapter, dtype, compute_device))
                bar.update()
            writer.close()
            weight_map.update(dict.fromkeys(layout, shard))
            total_size += writer.nbytes
    if (target_dir / INDEX_FILE).is_file():
        write_index(out_dir, weight_map, total_size)
    write_config(target_dir / "config.json", out_dir, None if dtype == "auto" else getattr(torch, dtype))
    copy_tokenizer_files(target_dir, out_dir)
    cast = dtype_cast(tensors, dtype)
    return {
        "tensors": len(tensors),
        "lora_modules": len(adapter.modules),
        "bytes_written": total_size,
        "device": str(compute_device),
        **({"cast": cast} if cast else {}),
    }


def dtype_cast(tensors: dict[str, TensorInfo], setting: str) -> str | None:
    """What `apply.dtype` did to the target's stored floating-point tensors, when it changed their dtype: every
    tensor is re-rounded, the ones no LoRA touches too."""
    stored = sorted(
        {
            str(info.dtype).removeprefix("torch.")
            for info in tensors.values()
            if info.dtype.is_floating_point and output_dtype(setting, info.dtype) != info.dtype
        }
    )
    if not stored:
        return None
    return f"every {'/'.join(stored)} tensor of the target cast to {setting}"
