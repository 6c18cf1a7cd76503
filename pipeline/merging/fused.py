"""The fused engine: apply + merge in one pass over the base and target, with no adapted model ever written.

For each output tensor (mergekit's own architecture definition says which, in its order), the base and target
tensors are read once, each adapter's version is computed as the apply stage would, and the inputs are merged with
the parameters mergekit's resolver gives that tensor. The result equals apply + `run_merge`.

Memory stays flat as adapters accumulate: elementwise methods merge a block of rows at a time, and each adapted
input is computed for that block only (B[rows]@A), so `memory_budget` bounds all inputs of a block and the kernel's
temporaries together, whatever their number. Reading and writing run in threads of their own, and blocks are merged
side by side on the others. On the CPU, TIES, task arithmetic and linear at density 1 go through `kernel.py`'s one
pass per block, which also adds each LoRA product to the target on the fly (no adapted tensor is materialized);
everything else, and every block the kernel declines, goes to mergekit's own `merge_tensors`, the reference the
kernel is tested against. A weight no adapter touches is one shared tensor for every adapted model, read once by the
kernel; without the kernel, where every merged input is that one tensor, `merge_copies` computes mergekit's result
from it.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.console import tqdm
from pipeline.merging.adapted_model import check_compatibility, output_dtype, read_ahead, resolve_device
from pipeline.merging.config import input_models, tensor_parameters
from pipeline.merging.kernel import AdaptedRows, KernelMerge, materialize, promoted_dtype
from pipeline.merging.kernel import status as kernel_status
from pipeline.merging.mergekit_engine import MERGE_SEED
from pipeline.models.lora import LoraFactors, load_adapter
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
# temporaries sized by the block instead of the tensor.
ELEMENTWISE_METHODS = ("linear", "task_arithmetic", "ties")
# Of those, the ones `merge_copies` computes from one copy of an input repeated n times (linear sums float32
# products, whose multiples are not exact).
COPY_METHODS = ("task_arithmetic", "ties")
# Merge dtypes whose values times any count below this are exact in float32 (8 and 11 significant bits), so a sum
# of n equal terms, in whatever order a kernel adds them, is n times the term.
EXACT_COUNTS = {torch.bfloat16: 2**16, torch.float16: 2**13}
MEMORY_BUDGET = 1024**3
# Per input on the CPU: mergekit's TIES makes a dozen passes over each block, and blocks this small stay in the
# caches (measured on the 0.5B shapes with 10 inputs: 2x faster than 35 MB blocks; below ~100 KB the per-call
# overhead wins). The one-pass kernel reads each block once; 128 KB and 512 KB blocks measured the same CPU time.
CHUNK_BYTES = 512 * 1024
# Bytes a block's merge holds per input byte beyond the input itself: mergekit's deltas, signs, mask and masked
# deltas (the kernel holds each adapter's float32 LoRA product instead, two bytes per bfloat16 byte).
KERNEL_COPIES = 4
# MKL computes a one-row product with gemv, whose sums differ from the whole GEMM's: blocks have two rows or more.
MIN_ROWS = 2


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
        raise ValueError(
            f"mergekit has no architecture definition for {config.architectures}; the fused engine needs one "
            "(the mergekit engine does not)"
        )
    planned = []
    for module in arch.modules.values():
        configured = ConfiguredModuleArchitecture(
            info=module.architecture, config=config, weight_prefix=module.weight_prefix
        )
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


@dataclass(frozen=True)
class FusedSources:
    """What a fused merge reads, beside its mergekit config: the base, the target, each adapter by name (its archived
    directory), and the path that names its adapted model in the config (where apply writes it; nothing need be
    there: the fused engine computes it). `apply_dtype` is the adapted models' dtype, as apply would write them."""

    base_dir: Path
    target_dir: Path
    adapters: Mapping[str, Path]
    adapted: Mapping[str, str]
    apply_dtype: str


@dataclass(frozen=True)
class FusedOptions:
    """How a fused merge runs, none of which changes its result (mergekit's `MergeOptions`). `memory_budget` bounds
    the inputs of a block of rows and the kernel's temporaries (on `cuda`, GPU memory); `cache_bytes` keeps each
    tensor's inputs for the next merge of the same sources (a search); `max_shard_bytes` (default
    `MAX_SHARD_BYTES`) sizes the written shards."""

    device: str = "auto"
    trust_remote_code: bool = False
    memory_budget: int = MEMORY_BUDGET
    cache_bytes: int = 0
    max_shard_bytes: int | None = None


class FusedInputs:
    """Everything a merge over the base, the target and some adapters reads, opened once: the tensor plan, the
    readers and the LoRA modules, each adapter under its name. A search merges many configurations over the same
    inputs; with `cache_bytes` the inputs of each tensor (adapted tensors included) are kept in memory up to that
    budget, so later merges only rerun mergekit's kernel instead of reading and recomputing them."""

    def __init__(self, sources: FusedSources, options: FusedOptions | None = None):
        options = options or FusedOptions()
        reserved = sorted({"base", "target"} & set(sources.adapters))
        if reserved:
            raise ValueError(f"adapters named {reserved}: base and target name the merge's own models")
        self.base_dir, self.target_dir = Path(sources.base_dir), Path(sources.target_dir)
        self.apply_dtype = sources.apply_dtype
        self.target_tensors = model_tensors(self.target_dir)
        self.base_tensors = model_tensors(self.base_dir)
        self.adapters = {}
        for name, adapter_dir in sources.adapters.items():
            self.adapters[name] = load_adapter(adapter_dir)
            check_compatibility(self.adapters[name], self.target_tensors, {}, None, str(self.target_dir))
        self.named = {str(path): name for name, path in sources.adapted.items()}  # config path → adapter name
        self.device = resolve_device(options.device)
        self.planned = plan_tensors(self.base_dir, self.target_tensors, self.base_tensors, options.trust_remote_code)
        self.base_reader, self.target_reader = TensorReader(self.base_tensors), TensorReader(self.target_tensors)
        self.cache_bytes, self.memory_budget = options.cache_bytes, options.memory_budget
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
        """Each input model of `config` → "base", "target" or the name of the adapter its adapted model holds."""
        return {model: _role(model, self.base_dir, self.target_dir, self.named) for model in input_models(config)}

    def read(self, item: PlannedTensor, with_base: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        base = self.base_reader.read(item.base_name) if with_base else None
        return base, self.target_reader.read(item.target_name)

    def factors(self, item: PlannedTensor, roles) -> dict[str, LoraFactors]:
        """A and B of every adapter among `roles` that touches this tensor, read once for all its row blocks."""
        return {
            name: adapter.modules[item.target_name].factors(self.device)
            for name, adapter in self.adapters.items()
            if name in roles and item.target_name in adapter.modules
        }

    def _all_roles(self, with_base: bool) -> dict[str, str]:
        roles = {"target": "target", **{name: name for name in self.adapters}}
        return {**roles, "base": "base"} if with_base else roles

    def role_tensors(
        self, item: PlannedTensor, load_dtype: torch.dtype | None, *, with_base: bool, raw=None
    ) -> dict[str, torch.Tensor]:
        """The whole tensor of every role (target, each adapted model, and the base `with_base`) for one output
        tensor, on the merge device, each distinct tensor moved there once: the weight no adapter touches is one
        tensor shared by all of them, not a copy per adapter. Kept in the cache when it fits."""
        key = (item.weight.name, load_dtype)
        cached = self._cache.get(key)
        if cached is not None and (not with_base or "base" in cached):
            return cached
        base, target = raw if raw is not None else self.read(item, with_base)
        values = _on_device(
            tensor_inputs(
                item, base, target, self._all_roles(with_base), self.adapters, self.apply_dtype, self.device, load_dtype
            ),
            self.device,
        )
        size = sum(value.nbytes for value in _distinct(values))
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = values
            self._cached_bytes += size
        return values

    def adapted_tensor(self, item: PlannedTensor, name: str) -> torch.Tensor:
        """One adapted model's tensor, as apply writes it (only that adapter's product is computed)."""
        _, target = self.read(item, with_base=False)
        return tensor_inputs(item, None, target, {name: name}, self.adapters, self.apply_dtype, self.device, None)[name]

    def merged_tensors(
        self, config, order: list[PlannedTensor] | None = None, destinations: dict[str, torch.Tensor] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for every output tensor of `config` (a parsed MergeConfiguration whose model paths
        are the base, the target or the sources' adapted-model paths), in `order`. One thread reads the next tensor
        while the others each compute a row block's adapted inputs and merge it. A tensor of `destinations` (by name)
        in the merged tensor's dtype and shape is written in place and yielded itself."""
        from mergekit import merge_methods

        method = merge_methods.get(config.merge_method)
        models = input_models(config)
        roles = self.roles(config)
        with_base = "base" in roles.values()
        # Methods that prune at random (dare_*, della*) draw from torch's generator, tensor after tensor in this
        # order: seeding it here makes every merge of one config identical, on disk or in memory. They are never
        # elementwise, so each of their tensors is one block merged on this thread, in order.
        torch.manual_seed(MERGE_SEED)
        order = self.planned if order is None else order
        workers, threads = block_workers(self.device), torch.get_num_threads()

        def prepare(item: PlannedTensor) -> TensorWork:
            work = self._tensor_work(item, config, method, models, roles, with_base, workers)
            work.destination = (destinations or {}).get(item.weight.name)
            return work

        with _torch_threads(1), ThreadPoolExecutor(max_workers=workers) as blocks:
            for item, work in read_ahead(prepare, order):
                yield item.weight.name, work.merge_blocks(blocks, threads)
                del work

    def _tensor_work(
        self, item: PlannedTensor, config, method, models: list, roles: dict, with_base: bool, workers: int
    ) -> TensorWork:
        """Everything one output tensor's merge needs, read (or taken from the cache) and planned in blocks."""
        load_dtype = _load_dtype(item, config)
        merge = TensorMerge.resolve(method, config, item, models)
        if self.cache_bytes:  # a search: whole tensors, kept for the next configuration when they fit
            whole = self.role_tensors(item, load_dtype, with_base=with_base)
            distinct = len(_distinct(whole))

            def inputs(rows: slice | None) -> dict:
                return _rows_of(whole, rows)
        else:
            base, target = self.read(item, with_base)
            used = {roles[model]: roles[model] for model in models}
            factors = self.factors(item, used)
            distinct = len(factors) + 3  # the touched adapters' inputs, the untouched one, the target, the base
            # The kernel adds each LoRA product to the target itself; mergekit's code needs the adapted tensors.
            lazy = merge.kernel is not None and self.device.type == "cpu"

            def inputs(rows: slice | None) -> dict:
                values = tensor_inputs(
                    item,
                    base,
                    target,
                    used,
                    self.adapters,
                    self.apply_dtype,
                    self.device,
                    load_dtype,
                    rows=rows,
                    factors=factors,
                    lazy=lazy,
                )
                return values if lazy else _on_device(values, self.device)

        info = self.target_tensors[item.target_name]
        blocks = [None]
        if merge.elementwise and info.shape and info.dtype.is_floating_point:
            itemsize = (load_dtype or info.dtype).itemsize
            budget = self.memory_budget // workers  # each worker merges a block at a time
            blocks = row_blocks(info.shape[0], block_rows(info.shape, itemsize, distinct, budget, self.device))
        return TensorWork(item, merge, [roles[model] for model in models], inputs, blocks, config)

    def result_dtype(self, item: PlannedTensor, config) -> torch.dtype:
        from mergekit.common import dtype_from_name

        chosen = item.weight.force_dtype or config.out_dtype
        if chosen:
            return dtype_from_name(chosen)
        stored = self.target_tensors[item.target_name].dtype
        merge_dtype = dtype_from_name(config.dtype)
        return merge_dtype if merge_dtype and stored.is_floating_point else stored


@dataclass
class TensorWork:
    """One output tensor to merge: its inputs by row block (`inputs(rows)`, role → tensor, or AdaptedRows where
    the kernel computes the adapted rows itself), the blocks, and where to write it (`destination`, optional)."""

    item: PlannedTensor
    merge: TensorMerge
    input_roles: list[str]
    inputs: Callable[[slice | None], dict]
    blocks: list[slice | None]
    config: object
    destination: torch.Tensor | None = None

    def block_inputs(self, rows: slice | None) -> list:
        by_role = self.inputs(rows)
        return [by_role[role] for role in self.input_roles]

    def chosen_dtype(self) -> torch.dtype | None:
        """The output dtype the config forces (`out_dtype`, or the weight's own), else None: the merge dtype."""
        from mergekit.common import dtype_from_name

        chosen = self.item.weight.force_dtype or self.config.out_dtype
        return dtype_from_name(chosen) if chosen else None

    def merge_block(self, rows: slice | None, inputs: list | None = None) -> torch.Tensor:
        """One block merged by mergekit's own code (inputs materialized)."""
        from mergekit.merge_methods.buffers import copy_non_floating_buffer

        tensors = [materialize(value) for value in (self.block_inputs(rows) if inputs is None else inputs)]
        merged = copy_non_floating_buffer(tensors, self.item.weight.name)
        if merged is None:
            merged = self.merge(tensors)
        chosen = self.chosen_dtype()
        return merged.to(chosen) if chosen else merged

    def merge_blocks(self, pool: ThreadPoolExecutor, threads: int) -> torch.Tensor:
        """The merged tensor: a single block on this thread with `threads` per torch op (random methods draw in
        order), or every block on `pool`, each merged into its rows of the output (by the kernel where it covers
        the block, else by mergekit's code and copied there)."""
        if self.blocks == [None]:
            with _torch_threads(threads):
                return self.merge_block(None)
        out, allocation = None, threading.Lock()

        @torch.no_grad()  # grad mode is per thread; the output may be a loaded model's parameter
        def fill(rows: slice) -> None:
            nonlocal out
            inputs = self.block_inputs(rows)
            with allocation:
                if out is None:
                    out = self._allocate(inputs)
            kernel = self.merge.kernel
            if kernel is None or kernel(inputs, out[rows]) is None:
                out[rows] = self.merge_block(rows, inputs)

        for done in [pool.submit(fill, rows) for rows in self.blocks]:
            done.result()
        return out

    def _allocate(self, inputs: list) -> torch.Tensor:
        """The whole output: the destination when it fits, else a new tensor in mergekit's result dtype (the forced
        one, else the inputs' promoted dtype)."""
        first = inputs[0].target if isinstance(inputs[0], AdaptedRows) else inputs[0]
        dtype = self.chosen_dtype() or promoted_dtype([value.dtype for value in inputs])
        shape = (self.blocks[-1].stop, *first.shape[1:])
        target = self.destination
        layout = (dtype, shape, first.device, True)
        if target is not None and (target.dtype, tuple(target.shape), target.device, target.is_contiguous()) == layout:
            return target
        return torch.empty(shape, dtype=dtype, device=first.device)


@dataclass(frozen=True)
class TensorMerge:
    """mergekit's method with the parameters its resolver gives one output tensor, and the kernel's version of it
    where the kernel reproduces it (`kernel`, None otherwise)."""

    method: object
    name: str
    models: list
    parameters: dict
    base_index: int | None
    elementwise: bool
    kernel: KernelMerge | None = None

    @classmethod
    def resolve(cls, method, config, item: PlannedTensor, models: list) -> TensorMerge:
        shared, per_input = tensor_parameters(config, item.weight.name, item.t, dict.fromkeys(models, item.weight.name))
        parameters = dict(shared)
        for spec in method.spec.input_parameters:
            parameters[spec.name] = {m: per_input[m][spec.name] for m in models if spec.name in per_input[m]}
        base_index = models.index(config.base_model) if config.base_model in models else None
        elementwise = method.spec.name in ELEMENTWISE_METHODS and all(
            density >= 1 for density in parameters.get("density", {}).values()
        )
        kernel = KernelMerge.resolve(method, parameters, models, base_index) if elementwise else None
        return cls(method, item.weight.name, models, parameters, base_index, elementwise, kernel)

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        from mergekit.merge_methods import merge_tensors

        copies = self.copies(tensors)
        if copies is not None:
            value, weight = copies
            return merge_copies(
                self.method.spec, tensors[self.base_index], value, len(tensors) - 1, weight, self.parameters
            )
        return merge_tensors(
            tensors,
            self.method,
            parameters=self.parameters,
            ids=self.models,
            base_index=self.base_index,
            name=self.name,
        )

    def copies(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, float] | None:
        """(tensor, weight) when every non-base input is that one tensor with that one weight, in a dtype where
        `merge_copies` is exact; None otherwise."""
        if not self.elementwise or self.method.spec.name not in COPY_METHODS or self.base_index is None:
            return None
        others = [tensor for index, tensor in enumerate(tensors) if index != self.base_index]
        weights = set(self.parameters["weight"].values())
        value, base = others[0], tensors[self.base_index]
        exact = len(others) < EXACT_COUNTS.get(value.dtype, 0) and base.dtype == value.dtype
        if exact and len(weights) == 1 and all(tensor is value for tensor in others):
            return value, weights.pop()
        return None


def merge_copies(
    spec, base: torch.Tensor, value: torch.Tensor, count: int, weight: float, parameters: dict
) -> torch.Tensor:
    """mergekit's task_arithmetic or TIES (density 1) result for `count` copies of `value` with one `weight`, bit
    for bit, at the cost of one input: the kernel's operations on one copy, with its two sums over the inputs
    replaced by `count` times the term. In bfloat16/float16 every partial sum of equal terms is exact in float32
    (8 or 11 significant bits times a count below EXACT_COUNTS), so the kernel's float32 sum is exactly that product
    whatever its order, and both round once to the dtype. Adding +0.0 gives the sum's +0 for terms of -0.
    tests/test_fused_scaling.py checks it against mergekit, special values included."""
    shared = {p.name: p.default for p in spec.shared_parameters}
    settings = shared | {name: setting for name, setting in parameters.items() if name in shared}
    delta = value - base
    scale = torch.tensor(weight, dtype=delta.dtype, device=delta.device)
    product = delta * scale
    one = torch.ones((), dtype=delta.dtype, device=delta.device)
    if spec.name == "ties":
        kept = (product > 0) | (product < 0)  # sign == majority sign: false for 0 and NaN
        mixed = ((product * kept).float() * count + 0.0).to(delta.dtype)
        divisor = torch.where(kept, (scale.float() * count).to(delta.dtype), one)
        divisor[divisor == 0] = 1
    else:
        mixed = (product.float() * count + 0.0).to(delta.dtype)
        divisor = (scale.float() * count).to(delta.dtype).reshape(1)
        divisor[divisor.abs() < 1e-8] = 1
    if settings["normalize"]:
        mixed /= divisor
    if settings["lambda"] != 1:
        mixed *= settings["lambda"]
    return (base + mixed).to(base.dtype)


def block_workers(device: torch.device) -> int:
    """Threads that merge row blocks side by side: one per core torch would use (on `cuda`, one: the GPU runs
    the kernels)."""
    return 1 if device.type == "cuda" else torch.get_num_threads()


@contextmanager
def _torch_threads(count: int):
    """Torch ops on `count` threads each meanwhile. The merge runs ops on one thread and merges row blocks on
    threads of its own instead: on small blocks OpenMP's fork-join gains little, and on a shared, loaded machine its
    spinning threads cost 8x the CPU time (TIES over 10 inputs, measured at load 9: 11.4 s CPU on two OpenMP
    threads, 1.4 s on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def block_rows(shape: tuple[int, ...], itemsize: int, inputs: int, budget: int, device: torch.device) -> int:
    """Rows per block so that `inputs` blocks and the kernel's temporaries fit `budget`, and on the CPU also the
    caches: the budget is divided among the inputs, so more adapters make blocks smaller, not memory larger."""
    per_input = budget // (inputs * (1 + KERNEL_COPIES))
    if device.type == "cpu":
        per_input = min(per_input, CHUNK_BYTES)
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    return max(MIN_ROWS, per_input // row_bytes)


def row_blocks(rows: int, per_block: int) -> list[slice]:
    """Consecutive blocks of `per_block` rows; a remainder under MIN_ROWS joins the block before it."""
    starts = list(range(0, rows, max(MIN_ROWS, per_block)))
    if len(starts) > 1 and rows - starts[-1] < MIN_ROWS:
        starts.pop()
    return [slice(start, stop) for start, stop in zip(starts, [*starts[1:], rows], strict=True)]


def _distinct(values: dict) -> list[torch.Tensor]:
    return list({id(value): value for value in values.values()}.values())


def _on_device(values: dict, device: torch.device) -> dict:
    """The same mapping with each distinct tensor moved to `device` once (shared tensors stay shared)."""
    moved = {id(value): value.to(device) for value in _distinct(values)}
    return {role: moved[id(value)] for role, value in values.items()}


def _rows_of(values: dict, rows: slice | None) -> dict:
    """Rows of every tensor, each distinct tensor sliced once (shared tensors stay shared)."""
    if rows is None:
        return values
    sliced = {id(value): value[rows] for value in _distinct(values)}
    return {role: sliced[id(value)] for role, value in values.items()}


def _load_dtype(item: PlannedTensor, config) -> torch.dtype | None:
    from mergekit.common import dtype_from_name

    return dtype_from_name(item.weight.force_dtype or config.dtype)


def fused_merge(config, sources: FusedSources, out_dir: Path, options: FusedOptions | None = None) -> dict:
    """Merge `config` (a parsed MergeConfiguration over the sources' base, target and adapted-model paths) into
    `out_dir`, writing tensors as they are produced (on a thread, while the next one merges). Returns counts for the
    summary."""
    options = options or FusedOptions()
    with FusedInputs(sources, options) as inputs:
        layout = {
            p.weight.name: (inputs.result_dtype(p, config), inputs.target_tensors[p.target_name].shape)
            for p in inputs.planned
        }
        shards = plan_shards(layout, options.max_shard_bytes or MAX_SHARD_BYTES)
        files = shard_names(len(shards))
        by_name = {p.weight.name: p for p in inputs.planned}
        order = [by_name[name] for shard in shards for name in shard]
        weight_map, total = {}, 0
        merged = inputs.merged_tensors(config, order)
        with (
            tqdm(total=len(order), desc="fused merge", unit="tensor", leave=False) as bar,
            ThreadPoolExecutor(max_workers=1) as disk,
        ):
            for file, shard in zip(files, shards, strict=True):
                writer = ShardWriter(out_dir / file, {name: layout[name] for name in shard})
                written = None
                for name, tensor in itertools.islice(merged, len(shard)):
                    if written is not None:
                        written.result()  # one tensor in flight: memory holds at most two outputs
                    written = disk.submit(writer.write, name, tensor)  # moved off a GPU there, beside the merge
                    bar.update()
                if written is not None:
                    written.result()
                writer.close()
                weight_map.update(dict.fromkeys(shard, file))
                total += writer.nbytes
    if len(files) > 1:
        write_index(out_dir, weight_map, total)
    return {
        "tensors": len(order),
        "bytes_written": total,
        "adapters": len(sources.adapters),
        "device": str(inputs.device),
        "merge_kernel": kernel_status() if inputs.device.type == "cpu" else "not on a GPU: mergekit's torch code",
    }


def load_merged(inputs: FusedInputs, config, model) -> None:
    """Write the merge of `config` into an already loaded model's weights (in the model's dtype), so a search can
    score a configuration without writing a model to disk. The weights equal the fused merge's saved output loaded
    in that dtype."""
    weights = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in inputs.merged_tensors(config, destinations=weights):
            if name not in weights:
                raise ValueError(f"{name}: merged tensor has no weight of that name in the loaded model")
            if tensor is not weights[name]:
                weights[name].copy_(tensor)


def load_adapted(inputs: FusedInputs, name: str, model) -> None:
    """Write one adapted model (the target with adapter `name`, as apply writes it) into a loaded model's weights."""
    weights = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for item in inputs.planned:
            weights[item.weight.name].copy_(inputs.adapted_tensor(item, name))


def _role(model, base_dir: Path, target_dir: Path, named: dict[str, str]) -> str:
    path = str(model.model.path)
    if model.lora is not None:
        raise ValueError(f"{model}: LoRA references (model+lora) are not supported by the fused engine")
    if path in named:
        return named[path]
    if Path(path).resolve() == Path(base_dir).resolve():
        return "base"
    if Path(path).resolve() == Path(target_dir).resolve():
        return "target"
    raise ValueError(f"{path} is neither the base, the target nor an adapted model of this merge")


def tensor_inputs(
    item,
    base,
    target,
    roles,
    loaded,
    apply_dtype,
    device,
    load_dtype,
    *,
    rows: slice | None = None,
    factors: dict[str, LoraFactors] | None = None,
    lazy: bool = False,
) -> dict:
    """Every input of one tensor (of its `rows`, or all of it), each as mergekit's loader would hand it over: the
    adapted models' as apply writes them, then every input cast to the merge dtype. Adapters without this module
    all get one shared tensor, and so does the target when its cast provably gives the same tensor. `factors`
    (role → A and B) are read from the adapters when not given. `lazy`: adapted inputs are AdaptedRows (the
    target's rows and the LoRA product, for the kernel to add) instead of tensors."""

    def as_loaded(value: torch.Tensor) -> torch.Tensor:
        return value.to(load_dtype) if load_dtype and value.dtype != load_dtype else value

    if factors is None:
        factors = {
            role: loaded[role].modules[item.target_name].factors(device)
            for role in roles.values()
            if role in loaded and item.target_name in loaded[role].modules
        }
    if rows is not None:
        base, target = None if base is None else base[rows], target[rows]
    adapted_dtype = output_dtype(apply_dtype, target.dtype)
    untouched = as_loaded(target.to(adapted_dtype))
    # target → adapted dtype → merge dtype equals target → merge dtype when either cast is the identity.
    loaded_target = untouched if adapted_dtype in (target.dtype, load_dtype) else as_loaded(target)
    target32 = None
    values = {}
    for model, role in roles.items():
        if role == "base":
            values[model] = base
        elif role == "target":
            values[model] = loaded_target
        elif role not in factors:
            values[model] = untouched
        elif lazy:
            lora = factors[role]
            values[model] = AdaptedRows(
                target, lora.product(slice(None) if rows is None else rows), lora.scale, adapted_dtype, load_dtype
            )
        else:
            if target32 is None:
                target32 = target.to(device, torch.float32)
            # target + scale·(B@A) in float32, rounded once: PEFT's in-place `weight += delta`, as apply computes it
            values[model] = as_loaded(
                (target32 + factors[role].delta(slice(None) if rows is None else rows)).to(adapted_dtype)
            )
    return values
