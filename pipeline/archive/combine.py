"""`python -m pipeline.archive combine`: several archived adapters made into one with PEFT's `add_weighted_adapter`.

For users who want one small adapter rather than a merged model. PEFT combines LoRA layers inside a model, so the
base model is loaded (on real sizes that is the whole base in memory, in its stored dtype); only the combined
adapter is saved.

The default is `cat`: the combined adapter's update is exactly Σ wᵢ·sᵢ·BᵢAᵢ (its rank the sum of the sources'),
what a weighted merge of LoRAs means. PEFT's own default, `linear`, adds the A factors and the B factors separately,
(Σ√wᵢ·Bᵢ)(Σ√wᵢ·sᵢ·Aᵢ): the weighted updates plus every cross term Bᵢ·Aⱼ (on two random rank-8 adapters its
update is 98 % off the weighted sum), and only for equal ranks; it stays available by name. `svd` factors the exact
sum to `--svd-rank`. Every manifest records how far the combined update is from the weighted sum, per module.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.archive.store import (
    ADAPTER_FILES,
    ArchiveError,
    canonical_adapter_config,
    new_manifest,
    verify_adapter,
    write_adapter,
)
from pipeline.models.hub import resolve_model

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG, ADAPTER_WEIGHTS = ADAPTER_FILES

# PEFT 0.21's combination_type values, spelled as PEFT spells them.
COMBINATION_TYPES = (
    "linear",
    "cat",
    "ties",
    "svd",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
NEEDS_DENSITY = tuple(c for c in COMBINATION_TYPES if c.startswith(("ties", "dare", "magnitude")))
DEFAULT_METHOD = "cat"
COMBINED = "combined"


def check_request(sources: list[str], weights: list[float], method: str, density: float | None) -> None:
    if method not in COMBINATION_TYPES:
        raise ValueError(f"--method {method!r}: not a PEFT combination_type (one of {', '.join(COMBINATION_TYPES)})")
    if len(sources) < 2 or len(set(sources)) != len(sources):
        raise ValueError(f"--adapters {','.join(sources)}: name two or more different adapters")
    if len(weights) != len(sources):
        raise ValueError(f"--weights: {len(weights)} weights for {len(sources)} adapters; give one per adapter")
    if method in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise ValueError(f"--method {method} prunes each update: give --density in (0, 1], e.g. 0.5")


def common_base(manifests: dict[str, dict]) -> str:
    bases = {name: manifest.get("base_model") for name, manifest in manifests.items()}
    if len(set(bases.values())) != 1:
        listing = ", ".join(f"{name}: {base}" for name, base in bases.items())
        raise ArchiveError(f"adapters trained on different bases cannot be combined ({listing})")
    return next(iter(bases.values()))


def combine_adapters(
    archive_dir: Path,
    sources: list[str],
    weights: list[float],
    name: str,
    method: str = DEFAULT_METHOD,
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    seed: int = 0,
    dtype: str = "auto",
) -> tuple[Path, bool]:
    """Combine archived adapters `sources` with `weights` into the archived adapter `name` (kind `combined`).
    `density` prunes for ties/dare/magnitude methods; `svd_rank` sets the rank of *svd methods (default: the
    largest source rank); `seed` fixes DARE's random drop. PEFT stores the combined factors in the base's dtype
    (`auto`: as stored, bf16 for most releases, which rounds them to ~3 significant digits); `float32` keeps them
    exact at twice the base's memory. Returns (path, written) as `write_adapter` does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    check_request(sources, weights, method, density)
    archive_dir = Path(archive_dir)
    manifests = {source: verify_adapter(archive_dir / source) for source in sources}
    base_model = common_base(manifests)
    base_dir = resolve_model(base_model, f"base_model of {sources[0]}")
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype="auto" if dtype == "auto" else getattr(torch, dtype), use_safetensors=True
    )
    # PEFT adapter names become module keys, which cannot hold '.', so sources are loaded by position.
    peft_names = [f"source_{index}" for index in range(len(sources))]
    model = PeftModel.from_pretrained(model, archive_dir / sources[0], adapter_name=peft_names[0])
    for source, peft_name in zip(sources[1:], peft_names[1:], strict=True):
        model.load_adapter(archive_dir / source, adapter_name=peft_name)
    torch.manual_seed(seed)
    model.add_weighted_adapter(
        peft_names, weights, COMBINED, combination_type=method, density=density, svd_rank=svd_rank
    )
    targets = {manifest.get("target_model") for manifest in manifests.values()}
    combination = {
        "tool": "peft add_weighted_adapter",
        "combination_type": method,
        "density": density,
        "svd_rank": svd_rank,
        "seed": seed,
        "dtype": str(model.dtype).removeprefix("torch."),
        "sources": [
            {
                "name": source,
                "weight": weight,
                "kind": manifests[source].get("kind"),
                "files": manifests[source]["files"],
            }
            for source, weight in zip(sources, weights, strict=True)
        ],
    }
    manifest = new_manifest(
        "combined",
        base_model,
        base_dir,
        combination=combination,
        target_model=targets.pop() if len(targets) == 1 else None,
    )
    with tempfile.TemporaryDirectory(prefix="ftmerge-combine-") as work:
        model.save_pretrained(work, selected_adapters=[COMBINED])
        saved = Path(work) / COMBINED
        config = json.loads((saved / ADAPTER_CONFIG).read_text())
        # PEFT writes the combined factors for a scale of 1 (lora_alpha = r); rsLoRA's alpha/√r would rescale them.
        config["use_rslora"] = False
        (saved / ADAPTER_CONFIG).write_text(json.dumps(config))
        combination.update(reconstruction_error(saved, [archive_dir / source for source in sources], weights))
        config = canonical_adapter_config(config, base_model)
        return write_adapter(archive_dir, name, config, saved / ADAPTER_WEIGHTS, manifest)


def weighted_update(adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·sᵢ·BᵢAᵢ per module (float32): what combining the adapters with these weights means."""
    from pipeline.models.lora import load_adapter

    total: dict[str, torch.Tensor] = {}
    for path, weight in zip(adapters, weights, strict=True):
        for name, module in load_adapter(path).modules.items():
            total[name] = total.get(name, 0) + weight * module.delta()
    return total


def reconstruction_error(combined: Path, sources: list[Path], weights: list[float]) -> dict:
    """‖combined update − Σ wᵢ·sᵢ·BᵢAᵢ‖ / ‖Σ wᵢ·sᵢ·BᵢAᵢ‖ per module, its largest and mean value: ~1e-7 for `cat`
    (float rounding), the truncation for `svd`, the cross terms for `linear`."""
    import torch

    from pipeline.models.lora import load_adapter

    exact = weighted_update(sources, weights)
    modules = load_adapter(combined).modules
    errors = {}
    for name, expected in exact.items():
        got = modules[name].delta() if name in modules else torch.zeros_like(expected)
        norm = torch.linalg.norm(expected)
        errors[name] = float(torch.linalg.norm(got - expected) / norm) if norm > 0 else float(torch.linalg.norm(got))
    return {
        "reconstruction_error_max": max(errors.values(), default=0.0),
        "reconstruction_error_mean": sum(errors.values()) / len(errors) if errors else 0.0,
        "reconstruction_error_reference": "sum over sources of weight · scale · B @ A, per module",
    }
