"""`python -m pipeline.archive extract`: a full fine-tune's difference from its base, as a LoRA in the archive.

mergekit's `mergekit-extract-lora` does the decomposition (a truncated SVD of W_ft - W_base per linear layer). By
default embeddings and norms are excluded (mergekit would otherwise store them at full rank in modules_to_save, and
they would overwrite the target's). Bias deltas, which mergekit stores as `lora_B.bias`, are dropped: a plain LoRA
cannot carry them. The manifest records, per module, how well the adapter reconstructs the fine-tune, and every
tensor the fine-tune changed that the adapter leaves out, so nothing is lost silently.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.archive.store import canonical_adapter_config, new_manifest, write_adapter
from pipeline.fingerprint import model_fingerprint
from pipeline.models.hub import resolve_model
from pipeline.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, load_adapter
from pipeline.models.safetensors_io import TensorReader, model_tensors
from pipeline.recipe import EMBEDDING_MODULES

LOG = logging.getLogger(__name__)
DEFAULT_EXCLUDES = (rf"(^|\.)({'|'.join(EMBEDDING_MODULES)})$", r"norm")


def run_mergekit_extraction(
    model_dir: Path,
    base_dir: Path,
    out_dir: Path,
    rank: int,
    excludes: list[str],
    device: str,
    trust_remote_code: bool = False,
) -> None:
    """mergekit-extract-lora through its own entry point (click command, in this process)."""
    from mergekit.scripts.extract_lora import main

    args = [
        "--model",
        str(model_dir),
        "--base-model",
        str(base_dir),
        "--out-path",
        str(out_dir),
        "--max-rank",
        str(rank),
        "--device",
        device,
        "--skip-undecomposable",
    ]
    args += [flag for regex in excludes for flag in ("--exclude-regex", regex)]
    if trust_remote_code:
        args.append("--trust-remote-code")
    main.main(args=args, standalone_mode=False)


def drop_bias_deltas(adapter_dir: Path) -> list[str]:
    """Remove mergekit's `lora_B.bias` tensors (bias deltas) from the adapter; returns their names."""
    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    tensors = load_file(weights_file)
    biases = sorted(name for name in tensors if name.endswith(".lora_B.bias"))
    if biases:
        save_file({k: v for k, v in tensors.items() if k not in biases}, weights_file, metadata={"format": "pt"})
    return biases


def _relative(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    norm = torch.linalg.vector_norm(denominator).item()
    return torch.linalg.vector_norm(numerator).item() / norm if norm else None


def compare_with_finetune(adapter: LoraAdapter, model_dir: Path, base_dir: Path) -> tuple[dict, dict]:
    """One pass over the fine-tune's tensors. Returns (reconstruction_error, left_out): per LoRA module
    ||W_ft - W_base - scale·B@A|| / ||W_ft - W_base|| (None when the fine-tune did not change it), and for every
    other tensor the fine-tune changed, ||W_ft - W_base|| and its ratio to ||W_base|| (or both shapes, when the
    fine-tune resized it or the base lacks it)."""
    model_tensor_infos, base_tensor_infos = model_tensors(model_dir), model_tensors(base_dir)
    errors, left_out = {}, {}
    with TensorReader(model_tensor_infos) as finetuned, TensorReader(base_tensor_infos) as base:
        for name in tqdm(list(model_tensor_infos), desc="reconstruction error", unit="tensor", leave=False):
            if name not in base_tensor_infos or base_tensor_infos[name].shape != model_tensor_infos[name].shape:
                base_shape = base_tensor_infos[name].shape if name in base_tensor_infos else None
                left_out[name] = {
                    "shape": list(model_tensor_infos[name].shape),
                    "base_shape": list(base_shape) if base_shape else None,
                }
                continue
            base_weight = base.read(name).float()
            delta = finetuned.read(name).float() - base_weight
            module = adapter.modules.get(name)
            if module is not None:
                errors[name.removesuffix(".weight")] = _relative(delta - module.delta(), delta)
            elif torch.any(delta != 0):
                left_out[name] = {
                    "delta_norm": torch.linalg.vector_norm(delta).item(),
                    "relative_to_base": _relative(delta, base_weight),
                }
    return errors, left_out


def extract_adapter(
    archive_dir: Path,
    model: str,
    base_model: str,
    name: str,
    rank: int = 32,
    *,
    excludes: Sequence[str] = (),
    target_model: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Path, bool]:
    """Extract `model` - `base_model` as a rank-`rank` LoRA and archive it as `name` (kind `extracted`).
    `excludes` are regexes of module names left out in addition to embeddings and norms. Returns (path, written)."""
    model_dir, base_dir = resolve_model(model, "--model"), resolve_model(base_model, "--base")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    excluded = [*DEFAULT_EXCLUDES, *excludes]
    with tempfile.TemporaryDirectory(prefix="ftmerge-extract-") as work:
        work = Path(work)
        run_mergekit_extraction(model_dir, base_dir, work, rank, excluded, device, trust_remote_code)
        drop_bias_deltas(work)
        config = canonical_adapter_config(json.loads((work / ADAPTER_CONFIG).read_text()), base_model)
        (work / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        errors, left_out = compare_with_finetune(load_adapter(work), model_dir, base_dir)
        measured = [e for e in errors.values() if e is not None]
        if left_out:
            LOG.warning(
                "%d tensors changed by the fine-tune are not in the adapter (excluded, biases or not "
                "decomposable); manifest.json lists them under extraction.left_out",
                len(left_out),
            )
        manifest = new_manifest(
            "extracted",
            base_model,
            base_dir,
            target_model=target_model,
            extraction={
                "model": model,
                "model_resolved": str(model_dir),
                "model_fingerprint": model_fingerprint(str(model_dir)),
                "tool": "mergekit-extract-lora",
                "rank": rank,
                "excluded": excluded,
                "module_ranks": {**{m: config["r"] for m in errors}, **config.get("rank_pattern", {})},
                "reconstruction_error_max": max(measured, default=None),
                "reconstruction_error": errors,
                "left_out": left_out,
            },
        )
        return write_adapter(archive_dir, name, config, work / ADAPTER_WEIGHTS, manifest)
