"""What a merge search may try: the recipe's bounds turned into Optuna suggestions, and each suggestion into the
`merge:` settings the merge stage would run with. The two baselines are points of the same space.

A trial's parameters are named so that they read as recipe keys: `method`, `base_model`, `normalize`,
`target_weight`, `weight.<adapter>` and `density.<adapter>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.merging.config import method_spec
from pipeline.recipe import PUBLISHED_PARAMETERS, MergeConfig

# The baselines' labels: the published "LoRA + TIES" configuration (the recipe's default merge), and the plain sum of
# the adapters' deltas over the target.
PUBLISHED, SUM = "published", "sum"

# Methods whose inputs the fused engine merges per tensor (a `models:` config with per-model weight/density).
SEARCHABLE_METHODS = (
    "ties",
    "task_arithmetic",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "linear",
    "della",
    "della_linear",
)
# Of those, the ones that prune each delta to `density` (task_arithmetic takes the key but never reads it).
PRUNING_METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")


@dataclass(frozen=True)
class Space:
    """Plain bounds (the recipe's `search.space`) over the adapters being merged."""

    adapters: tuple[str, ...]
    methods: tuple[str, ...]
    base_models: tuple[str, ...]
    weight: tuple[float, float]
    density: tuple[float, float]
    target_weight: tuple[float, float]
    normalize: tuple[bool, ...]


def baselines(adapters: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Trial 0 `published`: the recipe schema's default merge, which is the published recipe's (TIES over the base,
    every weight and density 1, normalize, int8_mask). Trial 1 `sum`: task arithmetic relative to the target,
    T + Σ Δᵢ — only the adapters' own deltas."""
    default = MergeConfig()
    published = {
        "method": default.method,
        "base_model": default.base_model,
        "normalize": PUBLISHED_PARAMETERS["normalize"],
        "target_weight": default.weight,
        **{f"weight.{name}": default.weight for name in adapters},
        **{f"density.{name}": default.density for name in adapters},
    }
    total = {
        "method": "task_arithmetic",
        "base_model": "target",
        "normalize": False,
        **{f"weight.{name}": 1.0 for name in adapters},
    }
    return {PUBLISHED: published, SUM: total}


def with_baselines(space: Space) -> Space:
    """The space, its categorical choices widened to hold both baselines (so Optuna can record them as trials)."""
    return Space(
        space.adapters,
        tuple(dict.fromkeys([*space.methods, "ties", "task_arithmetic"])),
        tuple(dict.fromkeys([*space.base_models, "base", "target"])),
        space.weight,
        space.density,
        space.target_weight,
        tuple(dict.fromkeys([*space.normalize, True, False])),
    )


def takes(method: str) -> set[str]:
    """The names of the parameters a mergekit method reads (per model and shared)."""
    return {parameter.name for parameter in method_spec(method).parameters}


def uses_base(method: str) -> bool:
    return method_spec(method).contract.base.value != "ignored"


def suggest(trial, space: Space) -> dict[str, Any]:
    """One point of the space from an Optuna trial (fixed values when the trial was enqueued). Parameters that the
    chosen method does not read are not suggested, so TPE does not learn from values that changed nothing."""
    method = trial.suggest_categorical("method", list(space.methods))
    parameters = takes(method)
    point: dict[str, Any] = {"method": method}
    if uses_base(method):
        point["base_model"] = trial.suggest_categorical("base_model", list(space.base_models))
    if "normalize" in parameters:
        point["normalize"] = trial.suggest_categorical("normalize", list(space.normalize))
    if point.get("base_model") != "target":
        point["target_weight"] = trial.suggest_float("target_weight", *space.target_weight)
    for name in space.adapters:
        point[f"weight.{name}"] = trial.suggest_float(f"weight.{name}", *space.weight)
        if method in PRUNING_METHODS:
            point[f"density.{name}"] = trial.suggest_float(f"density.{name}", *space.density)
    return point


def merge_settings(point: dict[str, Any]) -> dict[str, Any]:
    """The recipe's `merge:` keys for a point: what `chosen.yml` holds and the merge stage applies."""
    method = point["method"]
    shared = {parameter.name for parameter in method_spec(method).shared_parameters}
    parameters = {name: value for name, value in PUBLISHED_PARAMETERS.items() if name in shared}
    if "normalize" in point:
        parameters["normalize"] = point["normalize"]
    base_model = point.get("base_model", "base")
    models = {}
    for key, value in point.items():
        if key.startswith(("weight.", "density.")):
            field, adapter = key.split(".", 1)
            models.setdefault(adapter, {})[field] = value
    return {
        "method": method,
        "base_model": base_model,
        "include_target": base_model != "target",
        "weight": point.get("target_weight", 1.0),
        "density": 1.0,
        "models": models,
        "parameters": parameters,
    }
