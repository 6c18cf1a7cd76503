"""The fused engine: apply + merge in one pass over the base and target, with no adapted model ever written.

For each output tensor (mergekit's own architecture definition says which, in its order), the base and target
tensors are read once, each adapter's version is computed as the apply stage would, and the list goes to mergekit's
`merge_tensors` with the parameters mergekit's resolver gives that tensor. The result equals apply + `run_merge`.
Work that provably changes nothing is skipped: a weight no adapter touches is, in every adapted model, the target's
own tensor cast to the apply dtype, so all those inputs share one tensor instead of being copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.merging.adapted_model import check_compatibility, output_dtype, resolve_device
from pipeline.merging.config import input_models, tensor_parameters
from pipeline.merging.mergekit_engine import MERGE_SEED
from pipeline.models.lora import adapted_weight, load_adapter
from pipeline.models.safetensors_io import (
    ShardWriter,
    TensorReader,
    model_tensors,
    plan_shards,
    shard_names,
    write_index,
)

MAX_SHARD_BYTES = 5 * 1000**3
# Methods whose result at each element depends only on that element of each input (no pruning by magnitude or at
# random when every density is 1): merging row blocks gives exactly the whole tensor's result, with the kernel's
# temporaries (deltas, signs, masks: several times the tensor per input) sized by the block instead of the tensor.
ELEMENTWISE_METHODS = ("linear", "task_arithmetic", "ties")
CHUNK_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its mergekit weight, gradient position `t`, and the names to read from base and target
    (base_name is None when the method takes no base)."""

    weight: object
    t: float
    target_name: str
    base_name: str | None


def plan_tensors(config_dir: Path, target: dict, base: dict | None, trust_remote_code: bool) -> list[PlannedTensor]:
    """The output tensors mergekit's planner would produce for a `models:` config, with their `t`."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.base import ConfiguredModuleArchitecture
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
    arch = arch_info_for_config(config)
    if arch is None:
        raise ValueError(f"mergekit has no architecture definition for {config.architectures}; the fused engine "
                         "needs one. Set merge.engine: mergekit")
    planned = []
    for module in arch.modules.values():
        configured = ConfiguredModuleArchitecture(info=module.architecture, config=config,
                                                  weight_prefix=module.weight_prefix)
        layers = configured.num_layers()
        weights = [(w, 0.0) for w in configured.pre_weights()]
        for index in range(layers):
            t = index / (layers - 1) if layers > 1 else 1.0
            weights += [(w, t) for w in configured.layer_weights(index)]
        weights += [(w, 0.0) for w in configured.post_weights()]
        for weight, t in weights:
            models = {"target": target} if base is None else {"target": target, "base": base}
            direct = [weight.name, *(weight.aliases or ())]
            if weight.optional and not any(name in tensors for name in direct for tensors in models.values()):
                continue
            names = {role: _source_name(weight, tensors) for role, tensors in models.items()}
            missing = [role for role, name in names.items() if name is None]
            if missing:
                raise ValueError(f"{weight.name} is missing from the {missing[0]} model")
            planned.append(PlannedTensor(weight, t, names["target"], names.get("base")))
    return planned


def _source_name(weight, tensors: dict) -> str | None:
    """The name a mergekit loader would read for this weight: itself, an alias, or a tied weight."""
    candidates = [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]
    return next((name for name in candidates if name in tensors), None)


class FusedInputs:
    """Everything a merge over the base, the target and some adapters reads, opened once: the tensor plan, the
    readers and the LoRA modules. A search merges many configurations over the same inputs; with `cache_bytes`
    the inputs of each tensor (adapted tensors included) are kept in memory up to that budget, so later merges only
    rerun mergekit's kernel instead of reading and recomputing them."""

    def __init__(self, *, base_dir: Path, target_dir: Path, adapters: dict[str, Path], apply_dtype: str,
                 device: str = "auto", trust_remote_code: bool = False, cache_bytes: int = 0):
        self.base_dir, self.target_dir, self.apply_dtype = Path(base_dir), Path(target_dir), apply_dtype
        self.target_tensors = model_tensors(target_dir)
        self.base_tensors = model_tensors(base_dir)
        self.adapters = {}
        for path, adapter_dir in adapters.items():
            self.adapters[path] = load_adapter(adapter_dir)
            check_compatibility(self.adapters[path], self.target_tensors, {}, None, str(target_dir))
        self.device = resolve_device(device)
        self.planned = plan_tensors(base_dir, self.target_tensors, self.base_tensors, trust_remote_code)
        self.base_reader, self.target_reader = TensorReader(self.base_tensors), TensorReader(self.target_tensors)
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, torch.dtype | None], dict[str, torch.Tensor]] = {}
        self._cached_bytes = 0

    def close(self) -> None:
        self.base_reader.close()
        self.target_reader.close()
        self._cache.clear()

    def __enter__(self) -> FusedInputs:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def roles(self, config) -> dict:
        """Each input model of `config` → "base", "target" or the adapted-model path of its adapter."""
        return {model: _role(model, self.base_dir, self.target_dir, self.adapters) for model in input_models(config)}

    def read(self, item: PlannedTensor, with_base: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        base = self.base_reader.read(item.base_name) if with_base else None
        return base, self.target_reader.read(item.target_name)

    def role_tensors(self, item: PlannedTensor, load_dtype: torch.dtype | None, *, with_base: bool,
                     raw=None) -> dict[str, torch.Tensor]:
        """The tensor of every role (target, each adapted model, and the base `with_base`) for one output tensor,
        on the merge device, each distinct tensor moved there once: the weight no adapter touches is one tensor
        shared by all of them, not a copy per adapter."""
        key = (item.weight.name, load_dtype)
        cached = self._cache.get(key)
        if cached is not None and (not with_base or "base" in cached):
            return cached
        base, target = raw if raw is not None else self.read(item, with_base)
        roles = {"target": "target", **{path: path for path in self.adapters}}
        if with_base:
            roles["base"] = "base"
        values = tensor_inputs(item, base, target, roles, self.adapters, self.apply_dtype, self.device, load_dtype)
        moved: dict[int, torch.Tensor] = {}
        for value in values.values():
            if id(value) not in moved:
                moved[id(value)] = value.to(self.device)
        values = {role: moved[id(value)] for role, value in values.items()}
        size = sum(value.nbytes for value in moved.values())
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = values
            self._cached_bytes += size
        return values

    def merged_tensors(self, config, order: list[PlannedTensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for every output tensor of `config` (a parsed MergeConfiguration whose model paths
        are the base, the target or keys of `adapters`), in `order`; the next tensor is read while this one merges."""
        from mergekit import merge_methods
        from mergekit.common import dtype_from_name
        from mergekit.merge_methods.buffers import copy_non_floating_buffer

        method = merge_methods.get(config.merge_method)
        models = input_models(config)
        roles = self.roles(config)
        # Methods that prune at random (dare_*, della*) draw from torch's generator, tensor after tensor in this
        # order: seeding it here makes every merge of one config identical, on disk or in memory.
        torch.manual_seed(MERGE_SEED)
        order = self.planned if order is None else order

        with_base = "base" in roles.values()

        def read(item: PlannedTensor):
            cached = self._cache.get((item.weight.name, _load_dtype(item, config)))
            return None if cached is not None and (not with_base or "base" in cached) else self.read(item, with_base)

        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(read, order[0]) if order else None
            for position, item in enumerate(order):
                raw = upcoming.result()
                upcoming = pool.submit(read, order[position + 1]) if position + 1 < len(order) else None
                by_role = self.role_tensors(item, _load_dtype(item, config), with_base=with_base, raw=raw)
                tensors = [by_role[roles[model]] for model in models]
                merged = copy_non_floating_buffer(tensors, item.weight.name)
                if merged is None:
                    merged = _merge(method, config, item, models, tensors)
                if item.weight.force_dtype or config.out_dtype:
                    merged = merged.to(dtype_from_name(item.weight.force_dtype or config.out_dtype))
                yield item.weight.name, merged
                del by_role, tensors, merged, raw

    def result_dtype(self, item: PlannedTensor, config) -> torch.dtype:
        from mergekit.common import dtype_from_name

        chosen = item.weight.force_dtype or config.out_dtype
        if chosen:
            return dtype_from_name(chosen)
        stored = self.target_tensors[item.target_name].dtype
        merge_dtype = dtype_from_name(config.dtype)
        return merge_dtype if merge_dtype and stored.is_floating_point else stored


def _load_dtype(item: PlannedTensor, config) -> torch.dtype | None:
    from mergekit.common import dtype_from_name

    return dtype_from_name(item.weight.force_dtype or config.dtype)


def fused_merge(config, *, base_dir: Path, target_dir: Path, adapters: dict[str, Path], apply_dtype: str,
                out_dir: Path, device: str = "auto", trust_remote_code: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Merge `config` (a parsed MergeConfiguration whose adapted-model paths are keys of `adapters`, mapping each to
    its adapter directory) into `out_dir`, writing tensors as they are produced. Returns counts for the summary."""
    with FusedInputs(base_dir=base_dir, target_dir=target_dir, adapters=adapters, apply_dtype=apply_dtype,
                     device=device, trust_remote_code=trust_remote_code) as inputs:
        layout = {p.weight.name: (inputs.result_dtype(p, config), inputs.target_tensors[p.target_name].shape)
                  for p in inputs.planned}
        shards = plan_shards(layout, max_shard_bytes)
        files = shard_names(len(shards))
        by_name = {p.weight.name: p for p in inputs.planned}
        order = [by_name[name] for shard in shards for name in shard]
        weight_map, total = {}, 0
        merged = inputs.merged_tensors(config, order)
        with tqdm(total=len(order), desc="fused merge", unit="tensor", leave=False) as bar:
            for file, shard in zip(files, shards, strict=True):
                writer = ShardWriter(out_dir / file, {name: layout[name] for name in shard})
                for name, tensor in itertools.islice(merged, len(shard)):
                    writer.write(name, tensor.cpu())
                    bar.update()
                writer.close()
                weight_map.update(dict.fromkeys(shard, file))
                total += writer.nbytes
    if len(files) > 1:
        write_index(out_dir, weight_map, total)
    return {"tensors": len(order), "bytes_written": total, "adapters": len(adapters), "device": str(inputs.device)}


def load_merged(inputs: FusedInputs, config, model) -> None:
    """Write the merge of `config` into an already loaded model's weights (in the model's dtype), so a search can
    score a configuration without writing a model to disk. The weights equal the fused merge's saved output loaded
    in that dtype."""
    weights = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in inputs.merged_tensors(config):
            if name not in weights:
                raise ValueError(f"{name}: merged tensor has no weight of that name in the loaded model")
            weights[name].copy_(tensor)


def load_adapted(inputs: FusedInputs, adapted_path: str, model) -> None:
    """Write one adapted model (the target with one adapter, as apply writes it) into a loaded model's weights."""
    weights = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for item in inputs.planned:
            weights[item.weight.name].copy_(inputs.role_tensors(item, None, with_base=False)[adapted_path])


def _role(model, base_dir: Path, target_dir: Path, loaded: dict) -> str:
    path = str(model.model.path)
    if model.lora is not None:
        raise ValueError(f"{model}: LoRA references (model+lora) are not supported by the fused engine")
    if path in loaded:
        return path
    if Path(path).resolve() == Path(base_dir).resolve():
        return "base"
    if Path(path).resolve() == Path(target_dir).resolve():
        return "target"
    raise ValueError(f"{path} is neither the base, the target nor an adapted model of this merge")


def tensor_inputs(item, base, target, roles, loaded, apply_dtype, device, load_dtype) -> dict:
    """Every input of one tensor, each as mergekit's loader would hand it over: the adapted models' as apply writes
    them, then every input cast to the merge dtype. Adapters without this module all get one shared tensor."""

    def as_loaded(value: torch.Tensor) -> torch.Tensor:
        return value.to(load_dtype) if load_dtype and value.dtype != load_dtype else value

    adapted_dtype = output_dtype(apply_dtype, target.dtype)
    untouched = as_loaded(target.to(adapted_dtype))
    target32 = None
    values = {}
    for model, role in roles.items():
        if role == "base":
            value = base
        elif role == "target":
            value = target
        else:
            module = loaded[role].modules.get(item.target_name)
            if module is None:
                value = untouched
            else:
                if target32 is None:
                    target32 = target.to(device, torch.float32)
                value = adapted_weight(target32, module, adapted_dtype, device, keep_on_device=True)
        values[model] = value if value is untouched else as_loaded(value)
    return values


def _merge(method, config, item: PlannedTensor, models: list, tensors: list) -> torch.Tensor:
    from mergekit.merge_methods import merge_tensors

    shared, per_input = tensor_parameters(config, item.weight.name, item.t, dict.fromkeys(models, item.weight.name))
    parameters = dict(shared)
    for spec in method.spec.input_parameters:
        parameters[spec.name] = {m: per_input[m][spec.name] for m in models if spec.name in per_input[m]}
    base_index = models.index(config.base_model) if config.base_model in models else None

    def merge(parts: list[torch.Tensor]) -> torch.Tensor:
        return merge_tensors(parts, method, parameters=parameters, ids=models, base_index=base_index,
                             name=item.weight.name)

    first = tensors[0]
    elementwise = method.spec.name in ELEMENTWISE_METHODS and all(
        density >= 1 for density in parameters.get("density", {}).values())
    if not elementwise or first.ndim == 0 or first.nbytes <= CHUNK_BYTES:
        return merge(tensors)
    rows = max(1, CHUNK_BYTES * first.shape[0] // first.nbytes)
    return torch.cat([merge([tensor[start:start + rows] for tensor in tensors])
                      for start in range(0, first.shape[0], rows)])
