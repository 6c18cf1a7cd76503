"""Safetensors streamed one tensor at a time, so memory holds a tensor, never a shard or a model.

`safe_open` maps a whole shard and every page it touches stays in the process's resident set; `save_file` needs a
whole shard in memory. The format is an 8-byte header length, a JSON header of names, dtypes, shapes and byte
offsets, then raw little-endian data. Knowing every output tensor's name, dtype and shape up front, we read each
tensor with one `readinto` at its offset and write its bytes straight after a header written first.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, in the order of their data."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        data_start = 8 + length
        infos = [
            TensorInfo(
                name,
                path,
                TORCH_DTYPES[entry["dtype"]],
                tuple(entry["shape"]),
                data_start + entry["data_offsets"][0],
                data_start + entry["data_offsets"][1],
            )
            for name, entry in header.items()
        ]
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a valid safetensors header ({error!r})") from None
    return {info.name: info for info in sorted(infos, key=lambda info: info.start)}


def shard_files(model_dir: Path) -> list[str]:
    """The weight files of a model directory, as its index lists them (or the single file)."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).is_file():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (model_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors models are supported")


def model_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model directory, shard by shard, without reading any data."""
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_files(model_dir):
        tensors.update(read_header(Path(model_dir) / shard))
    return tensors


def read_tensor(info: TensorInfo, handle=None) -> torch.Tensor:
    """One tensor, read with `readinto` straight into its own storage (from `handle`, or the file opened for it)."""
    if handle is None:
        with open(info.file, "rb") as own:
            return read_tensor(info, own)
    tensor = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        handle.seek(info.start)
        filled = 0
        while filled < info.nbytes:
            count = handle.readinto(buffer[filled:])
            if not count:
                raise OSError(f"{info.file}: truncated while reading {info.name}")
            filled += count
    return tensor


class TensorReader:
    """Reads tensors by name with one open handle per file; each read allocates exactly that tensor."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors
        self._handles: dict[Path, object] = {}

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb")  # noqa: SIM115 (closed in close())
        return read_tensor(info, handle)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ShardWriter:
    """Writes one safetensors file whose tensors (name → (dtype, shape)) are declared up front, in that order."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        self.layout = layout
        self._pending = iter(layout.items())
        header, offset = {}, 0
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.nbytes = offset
        self._handle = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, (dtype, shape) = next(self._pending, (None, (None, None)))
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path.name}: expected {expected_name} {dtype} {shape}, got {name} "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
        if tensor.numel():
            self._handle.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        missing = [name for name, _ in self._pending]
        self._handle.close()
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} tensors never written, first {missing[0]}")


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def plan_shards(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def write_config(source_config: Path, out_dir: Path, dtype: torch.dtype | None, overrides: dict | None = None) -> None:
    """Copy a config.json as JSON, keys in their order, with its dtype set under both names: transformers 5 reads
    `dtype`, transformers 4.x, vLLM and llama.cpp's converter `torch_dtype`. Never through transformers 5's
    `save_pretrained`, which rewrites a Hub config (`rope_theta` moved, `sliding_window` nulled)."""
    config = json.loads(Path(source_config).read_text())
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config.update(torch_dtype=name, dtype=name)
    config.update(overrides or {})
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer_files(source_dir: Path, out_dir: Path) -> list[str]:
    """The tokenizer (chat template included) and generation_config of `source_dir`, copied as they are."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied
