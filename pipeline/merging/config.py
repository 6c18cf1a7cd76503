"""The mergekit configuration of a recipe's merge: one document that both engines obey and `mergekit-yaml` can rerun.

Validation uses mergekit's own schema, method registry, input contract and parameter resolver, on the structure
alone (no model is opened), so `--dry-run` catches a bad method, parameter or input count before anything runs.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigProblem
from pipeline.models.hub import resolve_model
from pipeline.recipe import PUBLISHED_PARAMETERS, MergeConfig

# A tensor name used to resolve parameters at check time (filters may select on names; any layer weight will do).
SAMPLE_TENSOR = "model.layers.0.self_attn.q_proj.weight"


class MergeConfigError(ConfigProblem):
    """A merge mergekit cannot run; `where` is the part of the `merge:` settings it concerns."""


def mergekit_only_keys(merge: MergeConfig) -> list[str]:
    """The settings given that only mergekit can run: a rebuilt vocabulary, layer slices, a mixture of experts."""
    return [key for key in ("tokenizer_source", "tokenizer", "slices", "moe") if getattr(merge, key)]


def resolve_engine(merge: MergeConfig) -> str:
    """`auto` is fused unless the merge needs mergekit (`mergekit_only_keys`)."""
    if merge.engine != "auto":
        return merge.engine
    return "mergekit" if mergekit_only_keys(merge) else "fused"


def model_path(name: str, adapter_models: dict[str, str], base: str, target: str) -> str:
    """A recipe's name for a model (base, target or an adapter) as the path mergekit reads; others as given."""
    return {"base": base, "target": target, **adapter_models}.get(name, name)


def slice_adapters(merge: MergeConfig) -> list[str]:
    """The names the slices' sources give, in order, once each (base and target included)."""
    names = [source.model for piece in merge.slices or [] for source in piece.sources]
    return list(dict.fromkeys(names))


def tokenizer_block(merge: MergeConfig, adapter_models: dict[str, str], base: str, target: str) -> dict | None:
    """mergekit's `tokenizer:` block with the recipe's model names turned into paths."""
    if merge.tokenizer is None:
        return None

    def path(name):
        return model_path(name, adapter_models, base, target)

    tokens = {}
    for token, setting in merge.tokenizer.tokens.items():
        setting = copy.deepcopy(setting)
        source = setting.get("source")
        if isinstance(source, str):
            setting["source"] = path(source)
        elif isinstance(source, dict) and "model" in source:
            source["model"] = path(source["model"])
        tokens[token] = setting
    block: dict[str, Any] = {
        "source": merge.tokenizer.source if merge.tokenizer.source == "union" else path(merge.tokenizer.source)
    }
    if tokens:
        block["tokens"] = tokens
    if merge.tokenizer.pad_to_multiple_of:
        block["pad_to_multiple_of"] = merge.tokenizer.pad_to_multiple_of
    return block


@cache
def resolve_model_once(reference: str, key: str, trust_remote_code: bool = False) -> Path:
    """A model's local directory, resolved (and for Hub ids, downloaded) once per process."""
    return resolve_model(reference, key, trust_remote_code=trust_remote_code)


def method_spec(method: str):
    from mergekit import merge_methods

    try:
        return merge_methods.get(method).spec
    except RuntimeError:
        known = ", ".join(sorted(method.spec.name for method in merge_methods.registered_methods()))
        raise MergeConfigError(f"{method!r} is not a mergekit merge method (known: {known})", ("method",)) from None


def model_parameters(merge: MergeConfig, adapter: str | None) -> dict[str, Any]:
    """weight/density for one input (the merge's defaults, then `merge.models.<adapter>`), kept only when the
    method takes them, plus the adapter's own extra parameters."""
    takes = {parameter.name for parameter in method_spec(merge.method).input_parameters}
    override = merge.models.get(adapter) if adapter else None
    parameters = {}
    for name in ("weight", "density"):
        value = getattr(override, name, None) if override else None
        if name in takes:
            parameters[name] = getattr(merge, name) if value is None else value
    parameters.update(override.parameters if override else {})
    return parameters


def merge_parameters(merge: MergeConfig) -> dict[str, Any]:
    """`merge.parameters` as written, or by default the published normalize/int8_mask where the method takes them."""
    if merge.parameters is not None:
        return copy.deepcopy(merge.parameters)
    shared = {parameter.name for parameter in method_spec(merge.method).shared_parameters}
    return {name: value for name, value in PUBLISHED_PARAMETERS.items() if name in shared}


def build_mergekit_config(merge: MergeConfig, adapter_models: dict[str, str], base: str, target: str) -> dict:
    """The published recipe's config: every adapted model and the target over the base, with the merge's method
    settings. `adapter_models` maps adapter names to their adapted-model paths. With `base_model: target` the merge is
    relative to the target (T + the adapters' merged deltas), so the target is the base and not also an input.
    With `merge.slices`, mergekit's `slices:` instead, each source's model named by the recipe's names."""
    takes_base = method_spec(merge.method).contract.base.value != "ignored"
    relative_to_target = takes_base and merge.base_model == "target"
    config: dict[str, Any] = {"merge_method": merge.method}
    if merge.slices:
        config["slices"] = [
            {
                "sources": [
                    {
                        "model": model_path(source.model, adapter_models, base, target),
                        "layer_range": list(source.layer_range),
                        **_parameters({**model_parameters(merge, source.model), **source.parameters}),
                    }
                    for source in piece.sources
                ],
                **_parameters(piece.parameters),
            }
            for piece in merge.slices
        ]
    else:
        models = [{"model": path, "parameters": model_parameters(merge, name)} for name, path in adapter_models.items()]
        if merge.include_target and not relative_to_target:
            models.append({"model": target, "parameters": model_parameters(merge, None)})
        config["models"] = models
    config["dtype"] = merge.dtype
    if takes_base:
        # A method that ignores the base (linear, karcher) would get it as one more input to average.
        config["base_model"] = target if relative_to_target else base
    parameters = merge_parameters(merge)
    if parameters:
        config["parameters"] = parameters
    source = merge.tokenizer_source
    if source:
        config["tokenizer_source"] = adapter_models.get(source, target if source == "target" else source)
    tokenizer = tokenizer_block(merge, adapter_models, base, target)
    if tokenizer:
        config["tokenizer"] = tokenizer
    return config


def _parameters(parameters: dict) -> dict:
    return {"parameters": copy.deepcopy(parameters)} if parameters else {}


def config_entries(config_dict: dict) -> list[dict]:
    """The model entries of a mergekit config as written: its `models:`, or every source of its `slices:`."""
    if "slices" in config_dict:
        return [source for piece in config_dict["slices"] for source in piece["sources"]]
    return config_dict["models"]


def input_models(config) -> list:
    """The inputs of every tensor in mergekit's order: the listed models, then the base unless it is listed."""
    models = [entry.model for entry in config.models]
    if config.base_model is not None and config.base_model not in models:
        models.append(config.base_model)
    return models


def tensor_parameters(config, tensor_name: str, t: float, inputs: dict, out_slice=None) -> tuple[dict, dict]:
    """(shared, per-input) parameters of one output tensor, resolved by mergekit's resolver exactly as its planner
    does for a `models:` config, or for one of a `slices:` config's output slices (filters on tensor names,
    gradients over `t`)."""
    from mergekit import merge_methods
    from mergekit.config import ConfigReader, InputSliceDefinition, OutputSliceDefinition
    from mergekit.parameter_resolver import resolve_parameters

    if out_slice is None:
        sources = [
            InputSliceDefinition(model=e.model, layer_range=(0, 1), parameters=e.parameters) for e in config.models
        ]
        if config.base_model is not None and config.base_model not in [entry.model for entry in config.models]:
            sources.append(InputSliceDefinition(model=config.base_model, layer_range=(0, 1)))
        out_slice = OutputSliceDefinition(sources=sources)
    reader = ConfigReader(config=config, t=t, slice_out=out_slice)
    return resolve_parameters(
        merge_methods.get(config.merge_method).spec,
        tensor_name=tensor_name,
        inputs=inputs,
        sources=reader.parameter_sources,
        base_model=config.base_model,
        t=t,
    )


def validate_mergekit_config(config_dict: dict, num_layers: int | None = None):
    """Parse with mergekit's MergeConfiguration and check method, parameters and inputs (of every slice, and its
    layer ranges inside `num_layers` when known); MergeConfigError locating the problem otherwise. Returns the parsed
    configuration."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    spec = method_spec(config_dict["merge_method"])
    sliced = "slices" in config_dict
    paths = [config_dict.get("base_model") or "", *(entry["model"] for entry in config_entries(config_dict))]
    for path in paths:
        if "+" in path or "@" in path:
            raise MergeConfigError(f"mergekit reads '+' and '@' in a model path as LoRA/revision syntax: {path}")
    try:
        config = MergeConfiguration.model_validate(copy.deepcopy(config_dict))
    except (ValidationError, RuntimeError) as error:
        raise MergeConfigError(f"mergekit rejects the generated config: {error}") from None
    known = {parameter.name for parameter in spec.parameters}
    shared = {parameter.name for parameter in spec.shared_parameters}
    levels = [(("parameters",), config.parameters)]
    levels += [(("slices", i, "parameters"), piece.parameters) for i, piece in enumerate(config.slices or [])]
    for where, parameters in levels:
        unknown = set(parameters or {}) - shared
        if unknown:
            raise MergeConfigError(
                f"{sorted(unknown)} are not parameters of {spec.name} "
                f"(it takes: {', '.join(sorted(shared)) or 'none'})",
                where,
            )
    for entry in [*(config.models or []), *(s for piece in config.slices or [] for s in piece.sources)]:
        unknown = set(entry.parameters or {}) - known
        if unknown:
            raise MergeConfigError(
                f"{sorted(unknown)} are not parameters of {spec.name} for {entry.model} "
                f"(per-model parameters it takes: {sorted(known - shared)})",
                ("slices" if sliced else "models",),
            )
    if not sliced:
        _check_inputs(config, spec, input_models(config), None)
        return config
    for index, piece in enumerate(config.slices):
        lengths = {end - start for start, end in (source.layer_range for source in piece.sources)}
        if len(lengths) > 1:
            raise MergeConfigError(f"every source needs the same number of layers, got {lengths}", ("slices", index))
        for source in piece.sources:
            if num_layers is not None and source.layer_range[1] > num_layers:
                raise MergeConfigError(
                    f"layer_range {list(source.layer_range)} of {source.model} is outside the model's {num_layers} "
                    f"layers (0..{num_layers}, end excluded)",
                    ("slices", index),
                )
        # mergekit's planner gives a slice's method its sources only: the base must be among them
        models = [source.model for source in piece.sources]
        _check_inputs(config, spec, models, piece, ("slices", index))
    return config


def _check_inputs(config, spec, models: list, out_slice, where: tuple = ()) -> None:
    from mergekit import merge_methods

    try:
        merge_methods.get(spec.name).validate_inputs(models, config.base_model)
        tensor_parameters(config, SAMPLE_TENSOR, 0.0, {model: SAMPLE_TENSOR for model in models}, out_slice)
    except (ValueError, RuntimeError, TypeError) as error:
        raise MergeConfigError(f"{spec.name} cannot merge these inputs: {error}", where) from None
