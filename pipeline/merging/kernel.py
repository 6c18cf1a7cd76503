"""mergekit's elementwise merges (TIES and task arithmetic at density 1, linear) in one pass over a block of rows,
equal to mergekit's own torch code bit for bit.

mergekit's `GeneralizedTaskArithmeticMerge.merge_group` makes about ten passes over every input per weight, each
rounding to the merge dtype; `merge_kernel.cpp` computes the same roundings element by element in one pass (its
header traces every intermediate). Two things depend on how torch was built and on the CPU, and are measured here
with torch itself rather than assumed: which elements of a block torch's float32 sum over the models adds as a
running sum and which as four interleaved partial sums (it depends on torch's vector width), and whether torch's
`addcmul_` (mergekit's linear merge) fuses its multiply-add.

The extension is compiled on first use with `torch.utils.cpp_extension` into torch's extension cache (outside the
clone: `$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), keyed by its source, the flags, torch's
version and the CPU. It includes only Python.h, so the build takes seconds. Where it cannot be built (no C++
compiler, no ninja) or does not cover a merge (`KernelMerge.resolve` or the call returns None: other methods,
density < 1, float64, a GPU, another mergekit version), the caller uses mergekit's own `merge_tensors`, which stays
the reference: tests/test_merge_kernel.py compares the two.

Why C++ rather than torch.compile or numba (measured on this project's CPU, TIES over 9 bfloat16 inputs, blocks of
256K elements, one thread): mergekit's code 28 ms a block; `torch.compile` of the same code 18.5 ms but not equal to
it (7% of the elements differ: Inductor keeps bfloat16 intermediates in float32), 10.6 ms and equal on that case with
`emulate_precision_casts`, after a 33 s compile per process and shape, with its own reduction order that nothing
pins down; this kernel about 2 ms, and it also adds the LoRA products. numba (not a dependency) would need the same
bit-level bfloat16/float16 code by hand, plus llvmlite, and compiles on first use as well.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("merge_kernel.cpp")
# No -ffast-math (signed zeros, NaN and subnormals must behave as in torch); no contraction of a*b+c into a fused
# multiply-add: the kernel fuses only where torch does, with std::fma. -fno-trapping-math and -fno-math-errno (torch
# is built with both) change no value; they let the compiler turn the kernel's selects into vector blends.
FLAGS = ("-O3", "-std=c++17", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno")
# Vector instructions of this CPU (AVX2/AVX-512, F16C here); a compiler that refuses it builds without.
NATIVE = "-march=native"
# The mergekit version whose merge code merge_kernel.cpp reproduces; another version falls back to mergekit's.
TRACED_MERGEKIT = "0.1.5"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
METHOD_CODES = {"ties": 0, "task_arithmetic": 1, "linear": 2}
# Values for the layout probe: rows (big, small, 0, 0, -big) sum to 0 as a running sum and to `small` as torch's
# interleaved partial sums (big + small rounds to big in float32); exact in bfloat16, float16 and float32.
PROBE_BIG, PROBE_SMALL = 2.0**14, 2.0**-10
# Columns per probe: enough to see a vector width of 64 floats (4 vectors per step), small enough that torch sums
# the probe on one thread.
PROBE_COLUMNS = 300

_lock = threading.Lock()
_module = None
_failure: str | None = None
_layouts: dict[torch.dtype, tuple[int, int] | None] = {}
_fused_multiply_add: bool | None = None
_fma_measured = False


def extension():
    """The compiled extension, or None (with the reason logged once) where it cannot be built."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
            except Exception as error:  # any build failure means mergekit's kernel, never a failed merge
                _failure = f"{type(error).__name__}: {error}".strip().splitlines()[0]
                LOG.warning("merge kernel unavailable, merging with mergekit's torch code (slower): %s", _failure)
        return _module


def status() -> str:
    """Whether the kernel merges here, for the merge's summary and `make setup`."""
    return "compiled" if extension() is not None else f"not built ({_failure}): mergekit's torch code merges"


def _build():
    try:
        return _load([*FLAGS, NATIVE])
    except Exception as error:  # a compiler without -march=native gets one more try without it
        LOG.info("merge kernel: building with %s failed (%s); building without it", NATIVE, error)
    return _load(list(FLAGS))


def _load(flags: list[str]):
    from torch.utils import cpp_extension

    key = "\n".join([SOURCE.read_text(), *flags, torch.__version__, platform.machine(), _cpu_flags()])
    name = f"ftmerge_merge_kernel_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, verbose=False)


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them): a build is reused only on the same kind of CPU."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor()


def sum_layout(dtype: torch.dtype) -> tuple[int, int] | None:
    """(float lanes, vector length of `dtype`) of torch's CPU sum kernel on this machine, from probes of
    `sum(dim=0)` over [5, columns] tensors; None when no single layout explains every probe (then mergekit's kernel
    is used). A block of `columns` elements adds its first `cascade_columns(columns)` elements as a running sum."""
    with _lock:
        if dtype not in _layouts:
            _layouts[dtype] = _measure_layout(dtype)
        return _layouts[dtype]


def cascade_columns(columns: int, layout: tuple[int, int]) -> int:
    """How many leading columns of a [models, columns] sum torch adds as a running sum (ATen's cascade_sum: four
    vectors at a time when a row fills a vector of the dtype, else four scalars; the rest by row_sum)."""
    lanes, vector = layout
    step = 4 * lanes if columns >= vector else 4
    return columns // step * step


def _measure_layout(dtype: torch.dtype) -> tuple[int, int] | None:
    measured = {}
    for columns in range(2, PROBE_COLUMNS):
        rows = torch.tensor([PROBE_BIG, PROBE_SMALL, 0.0, 0.0, -PROBE_BIG], dtype=dtype)
        summed = rows[:, None].expand(5, columns).contiguous().sum(dim=0).float()
        running = summed == 0
        count = int(running.sum())
        if not (running[:count].all() and (summed[count:] == PROBE_SMALL).all()):
            return None  # not a prefix of running sums followed by partial sums: an order this kernel does not know
        measured[columns] = count
    candidates = [(lanes, lanes * ratio) for lanes in (2, 4, 8, 16, 32, 64) for ratio in (1, 2, 4)]
    matching = [c for c in candidates if all(cascade_columns(m, c) == k for m, k in measured.items())]
    return matching[0] if matching else None


def fused_multiply_add() -> bool | None:
    """Whether torch's `addcmul_` (mergekit's linear merge adds each input with it) rounds once (a fused
    multiply-add) or twice, measured on vector and scalar positions; None when it differs between them."""
    global _fused_multiply_add, _fma_measured
    with _lock:
        if not _fma_measured:
            _fused_multiply_add = _measure_fused_multiply_add()
            _fma_measured = True
        return _fused_multiply_add


def _measure_fused_multiply_add() -> bool | None:
    # (1 + 2^-7)(1 + 2^-12 + 2^-23) is not a float32; its rounding error survives a fused multiply-add only.
    values, coefficient = 1 + 2.0**-7, 1 + 2.0**-12 + 2.0**-23
    product = torch.tensor(values, dtype=torch.float32) * torch.tensor(coefficient, dtype=torch.float32)
    result = torch.full((PROBE_COLUMNS,), -float(product))
    result.addcmul_(torch.full((PROBE_COLUMNS,), values), torch.tensor(coefficient, dtype=torch.float32))
    fused = result != 0
    if fused.all():
        return True
    return False if not fused.any() else None


@dataclass(frozen=True)
class AdaptedRows:
    """An adapted model's rows before they are computed: the target's rows plus a LoRA product B[rows]@A (float32,
    unscaled), as the apply stage adds them (`target32 + product·scale`, rounded to `adapted_dtype`), then cast to
    mergekit's load dtype. The kernel computes them on the fly; `materialize` is the same computation in torch."""

    target: torch.Tensor
    product: torch.Tensor
    scale: float
    adapted_dtype: torch.dtype
    load_dtype: torch.dtype | None

    @property
    def dtype(self) -> torch.dtype:
        return self.load_dtype or self.adapted_dtype

    def materialize(self) -> torch.Tensor:
        target32 = self.target.to(self.product.device, torch.float32)
        adapted = (target32 + self.product * self.scale).to(self.adapted_dtype)
        return adapted.to(self.load_dtype) if self.load_dtype and adapted.dtype != self.load_dtype else adapted


def materialize(value: torch.Tensor | AdaptedRows) -> torch.Tensor:
    return value.materialize() if isinstance(value, AdaptedRows) else value


@dataclass(frozen=True)
class KernelMerge:
    """One output tensor's merge as the kernel runs it: the method and its parameters bound as mergekit binds them."""

    method: str
    base_index: int | None
    weights: tuple[float, ...]  # per non-base input (per input for linear), in input order
    normalize: bool
    scale: float  # mergekit's `lambda`

    @classmethod
    def resolve(cls, method, parameters: dict, ids: list, base_index: int | None) -> KernelMerge | None:
        """The kernel's view of mergekit's `method` with `parameters` for inputs `ids`, or None when the kernel does
        not reproduce it (mergekit's own code then merges)."""
        from mergekit.merge_methods import generalized_task_arithmetic as gta
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import ParameterScope

        if _mergekit_version() != TRACED_MERGEKIT:
            return None
        name = method.spec.name
        if name not in METHOD_CODES or registry.get(name) is not method:
            return None
        if name != "linear":
            if not isinstance(method, gta.GeneralizedTaskArithmeticMerge) or base_index is None:
                return None
            if any(density < 1 for density in _per_input(parameters.get("density", 1.0), ids, base_index)):
                return None  # sparsified: mergekit's magnitude/random pruning is not elementwise
        specs = {spec.name: spec for spec in method.spec.parameters}
        weight_base = None if specs["weight"].scope == ParameterScope.INPUT else base_index
        if "weight" not in parameters or not _binds(parameters["weight"], ids, weight_base):
            return None  # mergekit's own code raises its error for a missing weight
        shared = {
            spec.name: spec.validate(parameters.get(spec.name, spec.default))
            for spec in specs.values()
            if spec.scope == ParameterScope.SHARED
        }
        weights = tuple(float(specs["weight"].validate(w)) for w in _per_input(parameters["weight"], ids, weight_base))
        return cls(name, base_index, weights, bool(shared["normalize"]), float(shared.get("lambda", 1.0)))

    def __call__(self, inputs: list, out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
        """Merge one block (`inputs`: tensors or AdaptedRows, in mergekit's input order) into `out` (allocated in
        `out_dtype`, or the merge dtype, when not given). Returns the result, or None when the kernel does not cover
        these inputs (dtypes, device, layout): the caller then runs mergekit's code."""
        module = extension()
        dtype = promoted_dtype([value.dtype for value in inputs])
        if module is None or dtype not in DTYPE_CODES or not _kernel_inputs(inputs, dtype):
            return None
        numel = inputs[0].target.numel() if isinstance(inputs[0], AdaptedRows) else inputs[0].numel()
        layout = sum_layout(dtype)
        fused = fused_multiply_add() if self.method == "linear" else False
        if numel < 2 or layout is None or fused is None:
            return None  # one element: torch reduces it along another path
        out_dtype = out_dtype or dtype
        shape = (inputs[0].target if isinstance(inputs[0], AdaptedRows) else inputs[0]).shape
        if out is None:
            out = torch.empty(shape, dtype=out_dtype)
        if out.dtype not in DTYPE_CODES or out.numel() != numel or not out.is_contiguous() or out.device.type != "cpu":
            return None
        sources, source_index = [], {}
        for value in inputs:
            if id(value) not in source_index:
                source_index[id(value)] = len(sources)
                sources.append(_source(value))
        if self.method == "linear":
            merged = [source_index[id(value)] for value in inputs]
            coefficients = torch.tensor([self.weights], dtype=torch.float32)  # mergekit's packed weights, [1, N]
            weights = coefficients[0].tolist()
            divisor = float(coefficients.sum(dim=1)[0])
            base_pointer, base_dtype = 0, 0
        else:
            base = inputs[self.base_index]
            merged = [source_index[id(value)] for index, value in enumerate(inputs) if index != self.base_index]
            if not merged:
                return None  # mergekit returns the base itself
            weights = torch.tensor(self.weights, dtype=dtype).float().tolist()  # rounded to the merge dtype
            divisor = _task_arithmetic_divisor(self.weights, dtype, len(shape)) if self.method != "ties" else 1.0
            base_pointer, base_dtype = base.data_ptr(), DTYPE_CODES[base.dtype]
        module.merge(
            METHOD_CODES[self.method],
            DTYPE_CODES[dtype],
            DTYPE_CODES[out.dtype],
            numel,
            cascade_columns(numel, layout),
            out.data_ptr(),
            base_pointer,
            base_dtype,
            sources,
            [(index, weight) for index, weight in zip(merged, weights, strict=True)],
            self.normalize,
            self.scale != 1,
            float(torch.tensor(self.scale, dtype=torch.float32)),
            divisor,
            bool(fused),
        )
        return out


@functools.cache
def _mergekit_version() -> str:
    from importlib.metadata import version

    return version("mergekit")


def _binds(value, ids: list, base_index: int | None) -> bool:
    """Whether a per-input parameter has a value for every input it binds (see `_per_input`)."""
    count = len(ids) - (base_index is not None)
    if isinstance(value, dict):
        return all(model in value for index, model in enumerate(ids) if index != base_index)
    return len(value) == count if isinstance(value, (list, tuple)) else True


def _per_input(value, ids: list, base_index: int | None) -> list:
    """A per-input parameter (a mapping by id, a sequence or a scalar, as mergekit accepts) for the inputs it
    binds: every input, or every non-base input when `base_index` is given."""
    bound = [model for index, model in enumerate(ids) if index != base_index]
    if isinstance(value, dict):
        return [value[model] for model in bound]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * len(bound)


def promoted_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """mergekit's merge dtype for inputs of these dtypes (its `promoted_dtype`)."""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _kernel_inputs(inputs: list, dtype: torch.dtype) -> bool:
    """Contiguous CPU tensors of one size, in dtypes the kernel reads (AdaptedRows: the target's rows and a float32
    product of the same size, loaded in the merge dtype `dtype` or not cast, as the kernel rounds them)."""
    tensors = []
    for value in inputs:
        if isinstance(value, AdaptedRows):
            if value.product.dtype != torch.float32 or value.product.shape != value.target.shape:
                return False
            if value.adapted_dtype not in DTYPE_CODES or value.load_dtype not in (None, dtype):
                return False
            tensors += [value.target, value.product]
        else:
            tensors.append(value)
    first = tensors[0]
    return all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype in DTYPE_CODES and t.shape == first.shape
        for t in tensors
    )


def _source(value) -> tuple:
    """(values pointer, dtype, product pointer or 0, scale, dtype the value is rounded to before the merge dtype)."""
    if isinstance(value, AdaptedRows):
        code = DTYPE_CODES[value.target.dtype]
        return (value.target.data_ptr(), code, value.product.data_ptr(), value.scale, DTYPE_CODES[value.adapted_dtype])
    return (value.data_ptr(), DTYPE_CODES[value.dtype], 0, 1.0, DTYPE_CODES[value.dtype])


def _task_arithmetic_divisor(weights: tuple[float, ...], dtype: torch.dtype, dims: int) -> float:
    """mergekit's task-arithmetic divisor, by its own torch operations: the weights in the merge dtype, summed, and
    set to 1 where almost zero."""
    tensor = torch.tensor(weights, dtype=dtype)
    while tensor.dim() < dims + 1:
        tensor.unsqueeze_(-1)
    divisor = tensor.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return float(divisor.reshape(-1)[0])
