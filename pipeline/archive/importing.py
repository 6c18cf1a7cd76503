"""`python -m pipeline.archive add`: archive a LoRA adapter trained elsewhere, once it is shown to fit the base.

Only what apply and merge can use gets in: a plain PEFT LoRA in safetensors whose every lora_A/lora_B pair updates
a tensor of the base's exact shape. The base is checked from its safetensors headers alone; no weights are loaded.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.archive.store import canonical_adapter_config, new_manifest, write_adapter
from pipeline.fingerprint import sha256_file
from pipeline.models.hub import resolve_model
from pipeline.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterRefused, LoraAdapter, load_adapter
from pipeline.models.safetensors_io import model_tensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors_only(source: Path) -> None:
    """Refuse an adapter directory whose weights are only a pickle: unpickling runs whatever code the file holds."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(
            f"{source}: not a directory; expected a PEFT adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    if (source / ADAPTER_WEIGHTS).is_file():
        return
    pickles = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterRefused(
            f"{source / pickles[0]}: a pickle (torch.save) file; loading one can run arbitrary code, so the archive "
            "takes safetensors only. Where you trust the file, convert it: PeftModel.from_pretrained(model, dir)"
            ".save_pretrained(out, safe_serialization=True), then add `out`."
        )
    raise FileNotFoundError(f"{source}: no {ADAPTER_WEIGHTS}")


def check_fits_base(adapter: LoraAdapter, base_model: str, base_dir: Path) -> None:
    """Every LoRA module must update a tensor the base has, of the same shape (read from safetensors headers)."""
    tensors = model_tensors(base_dir)
    for name, module in adapter.modules.items():
        pair = (
            f"lora_B {list(module.lora_B.shape)} @ lora_A {list(module.lora_A.shape)}"
            f"{' (fan_in_fan_out)' if module.fan_in_fan_out else ''}"
        )
        info = tensors.get(name)
        if info is None:
            raise AdapterRefused(
                f"adapter {adapter.path}: {name} ({pair}) has no tensor in the base {base_model}; "
                "it was trained on another architecture"
            )
        if info.shape != module.shape:
            raise AdapterRefused(
                f"adapter {adapter.path}: {name} is {list(info.shape)} in the base {base_model} but "
                f"the LoRA update is {list(module.shape)} ({pair}); it was trained on a model of "
                "another size"
            )


def import_adapter(
    archive_dir: Path, source: Path, name: str, base_model: str, target_model: str | None = None
) -> tuple[Path, bool]:
    """Check `source` and archive it as `name` (kind `imported`), its config pointing at `base_model` as given:
    recipes select archived adapters by that exact string. Returns (path, written) as `write_adapter` does."""
    source = Path(source)
    check_safetensors_only(source)
    adapter = load_adapter(source)
    base_dir = resolve_model(base_model, "--base")
    check_fits_base(adapter, base_model, base_dir)
    config = adapter.config
    manifest = new_manifest(
        "imported",
        base_model,
        base_dir,
        target_model=target_model,
        source={
            "path": str(source.resolve()),
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "files": {file: sha256_file(source / file) for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)},
        },
        lora={key: config.get(key) for key in ("r", "lora_alpha", "use_rslora", "target_modules")},
        lora_modules=len(adapter.modules),
    )
    return write_adapter(
        archive_dir, name, canonical_adapter_config(config, base_model), source / ADAPTER_WEIGHTS, manifest
    )
