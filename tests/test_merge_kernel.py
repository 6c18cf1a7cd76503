"""The one-pass merge kernel equals mergekit's own `merge_tensors` bit for bit: random shapes, dtypes, model counts,
weights and settings, with special values planted (signed zeros, infinities, NaN, subnormals, values where float32
rounds and where the order of the sum over the models shows). NaN payloads are not compared (torch's own differ
between its vector and scalar code), NaN positions and every other bit are."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.models import bit_identical

from pipeline.merging import kernel

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
METHODS = ["ties", "task_arithmetic", "linear"]
WEIGHTS = [1.0, 0.3, -0.4, 0.0, 0.7, 1.5, 1 / 3, 2.0**-20]
SHAPES = [(2,), (3,), (7, 5), (4, 33), (17,), (64, 65), (130, 97), (3, 500), (1000,), (31, 64)]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The fused engine runs torch ops on one thread per block; mergekit's reference here does too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def planted(shape, dtype: torch.dtype, generator: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """Random values over a wide range of magnitudes, a tenth of them replaced by special values."""
    values = torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape, generator=generator) * 3) * scale
    finfo = torch.finfo(dtype)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            finfo.tiny / 4,  # subnormal
            -finfo.tiny / 4,
            finfo.tiny,
            finfo.max,
            -finfo.max,
            finfo.max / 2,
            1.0,
            -1.0,
            1 + finfo.eps / 2,  # halfway: rounds to even
            2.0**14,  # with 2^-10: float32 sums where the order shows
            2.0**-10,
            -(2.0**14),
        ]
    )
    flat = values.reshape(-1)
    where = torch.randint(0, flat.numel(), (max(1, flat.numel() // 10),), generator=generator)
    flat[where] = special[torch.randint(0, len(special), (len(where),), generator=generator)]
    return values.to(dtype)


def random_case(method: str, dtype: torch.dtype, rng: random.Random, generator: torch.Generator):
    """(inputs, ids, base index, parameters) of one merge: 1-16 models (sometimes up to 20, where torch's sum
    cascades), some of them the same tensor, equal or distinct weights."""
    count = rng.randint(1, 16) if rng.random() < 0.85 else rng.randint(17, 20)
    shape = rng.choice(SHAPES)
    base = planted(shape, dtype, generator)
    pool = [(base.float() + planted(shape, torch.float32, generator, 0.002)).to(dtype) for _ in range(count)]
    shared = rng.random() < 0.3  # the weights no adapter touches: one tensor for many models
    models = [rng.choice(pool[:2]) if shared else pool[index] for index in range(count)]
    equal = rng.random() < 0.5
    weights = [rng.choice(WEIGHTS)] * count if equal else [rng.choice(WEIGHTS) for _ in range(count)]
    ids = [f"model-{index}" for index in range(count)] + ["base"]
    normalize = rng.random() < 0.5
    if method == "linear":
        parameters = {"weight": dict(zip(ids, [*weights, rng.choice(WEIGHTS)], strict=True)), "normalize": normalize}
    else:
        parameters = {
            "weight": dict(zip(ids, weights, strict=False)),
            "normalize": normalize,
            "int8_mask": rng.random() < 0.5,
            "lambda": rng.choice([1.0, 1.0, 0.7, 1 / 3]),
        }
        if method == "ties":
            parameters["density"] = dict.fromkeys(ids[:-1], 1.0)
    return [*models, base], ids, count, parameters


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_random_merges_equal_mergekit_bit_for_bit(method, dtype):
    from mergekit import merge_methods
    from mergekit.merge_methods.api import merge_tensors

    rng = random.Random(f"{method}-{dtype}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    merge_method = merge_methods.get(method)
    for case in range(40):
        inputs, ids, base_index, parameters = random_case(method, dtype, rng, generator)
        expected = merge_tensors(inputs, merge_method, parameters=parameters, ids=ids, base_index=base_index)
        merge = kernel.KernelMerge.resolve(merge_method, parameters, ids, base_index)
        assert merge is not None
        merged = merge(inputs)
        assert merged is not None, (case, ids, parameters)
        assert bit_identical(merged, expected), (case, len(ids) - 1, inputs[0].shape, parameters)
        out_dtype = rng.choice(DTYPES)  # merge.out_dtype: mergekit casts its result
        assert bit_identical(merge(inputs, out_dtype=out_dtype), expected.to(out_dtype)), (case, out_dtype)


@pytest.mark.parametrize(
    ("stored", "adapted", "load"),
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the published recipe
        (torch.bfloat16, torch.float32, torch.bfloat16),  # apply.dtype float32, merged in bfloat16
        (torch.float32, torch.bfloat16, None),  # no merge dtype: mergekit promotes (float32 base)
        (torch.bfloat16, torch.float16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_adapted_rows_merge_as_the_adapted_tensors_do(method, stored, adapted, load):
    """Adapted inputs given as the target's rows and a LoRA product (the kernel adds them) merge exactly as the
    materialized adapted tensors do in mergekit's code."""
    from mergekit import merge_methods
    from mergekit.merge_methods.api import merge_tensors

    rng = random.Random(f"{method}-{stored}-{adapted}-{load}")
    generator = torch.Generator().manual_seed(7)
    merge_method = merge_methods.get(method)
    for case in range(8):
        shape = rng.choice([(64, 65), (5, 96), (3, 7)])
        base = planted(shape, stored, generator).to(load or stored)
        target = (base.float() + planted(shape, torch.float32, generator, 0.002)).to(stored)
        count = rng.randint(1, 9)
        products = [planted(shape, torch.float32, generator, 1e-3) for _ in range(count)]
        scales = [rng.choice([1.0, 2.0, 0.5 / 3]) for _ in range(count)]
        lazy = [kernel.AdaptedRows(target, p, s, adapted, load) for p, s in zip(products, scales, strict=True)]
        untouched = target.to(adapted).to(load) if load else target.to(adapted)  # an adapter without this weight
        inputs = [*lazy, untouched, untouched, base]
        ids = [f"model-{index}" for index in range(len(inputs) - 1)] + ["base"]
        weights = [rng.choice(WEIGHTS) for _ in range(len(inputs))]
        parameters = {"weight": dict(zip(ids, weights, strict=True)), "normalize": rng.random() < 0.5}
        if method != "linear":
            parameters["weight"].pop("base")
            if method == "ties":
                parameters["density"] = dict.fromkeys(ids[:-1], 1.0)
        expected = merge_tensors(
            [kernel.materialize(value) for value in inputs],
            merge_method,
            parameters=parameters,
            ids=ids,
            base_index=len(inputs) - 1,
        )
        merged = kernel.KernelMerge.resolve(merge_method, parameters, ids, len(inputs) - 1)(inputs)
        assert merged is not None and bit_identical(merged, expected), (case, parameters)


def test_materialized_rows_equal_the_apply_stages_sum():
    """AdaptedRows.materialize is the apply stage's `target32 + scale·(B@A)`, rounded to the adapted dtype."""
    from pipeline.models.lora import LoraFactors

    generator = torch.Generator().manual_seed(3)
    target = torch.randn(12, 20, generator=generator).bfloat16()
    factors = LoraFactors(torch.randn(4, 20, generator=generator), torch.randn(12, 4, generator=generator), 0.7, False)
    rows = slice(2, 9)
    lazy = kernel.AdaptedRows(target[rows], factors.product(rows), factors.scale, torch.bfloat16, torch.bfloat16)
    expected = (target[rows].float() + factors.delta(rows)).to(torch.bfloat16)
    assert torch.equal(lazy.materialize().view(torch.int16), expected.view(torch.int16))


def test_roundings_equal_torch_casts():
    """The kernel's float32 → bfloat16/float16 rounding (and back) equals torch's casts on random bit patterns and
    on every boundary of float16's range."""
    module = kernel.extension()
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(2**31), 2**31, (1 << 22,), generator=generator, dtype=torch.int64).to(torch.int32)
    around_float16 = torch.arange(0x33000000 - 4096, 0x477FF000 + 4096, 61, dtype=torch.int32)  # 2^-25 .. 65520
    values = torch.cat([patterns, around_float16, -around_float16]).view(torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        code = kernel.DTYPE_CODES[dtype]
        rounded = torch.empty(values.shape, dtype=dtype)
        module.convert(values.data_ptr(), 0, rounded.data_ptr(), code, values.numel())
        assert bit_identical(rounded, values.to(dtype)), dtype
        widened = torch.empty(values.shape, dtype=torch.float32)
        module.convert(rounded.data_ptr(), code, widened.data_ptr(), 0, values.numel())
        assert bit_identical(widened, rounded.float()), dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_measured_sum_layout_holds_for_blocks_of_every_size(dtype):
    """torch's sum over the models adds the first `cascade_columns` elements of a block as a running sum and the
    rest as interleaved partial sums: measured on small probes, checked here on blocks up to the engine's size."""
    layout = kernel.sum_layout(dtype)
    assert layout is not None
    rng = random.Random(1)
    sizes = [2, 3, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 4099, 65536 + 7, 262144 + 61]
    for columns in sizes + [rng.randrange(2, 5000) for _ in range(20)]:
        rows = torch.tensor([kernel.PROBE_BIG, kernel.PROBE_SMALL, 0, 0, -kernel.PROBE_BIG], dtype=dtype)
        summed = rows[:, None].expand(5, columns).contiguous().sum(dim=0).float()
        running = kernel.cascade_columns(columns, layout)
        assert (summed[:running] == 0).all() and (summed[running:] == kernel.PROBE_SMALL).all(), columns


def test_what_the_kernel_does_not_cover_goes_to_mergekit(monkeypatch):
    """Sparsifying methods and densities below 1, other methods, float64, a tensor that is not contiguous or not on
    the CPU, one element, and another mergekit version: the kernel declines and mergekit's code merges."""
    from mergekit import merge_methods

    ids = ["a", "b", "base"]
    ties = merge_methods.get("ties")
    parameters = {"weight": {"a": 1.0, "b": 0.5}, "density": {"a": 1.0, "b": 1.0}}
    assert kernel.KernelMerge.resolve(merge_methods.get("dare_ties"), parameters, ids, 2) is None
    assert kernel.KernelMerge.resolve(ties, {**parameters, "density": {"a": 1.0, "b": 0.9}}, ids, 2) is None
    assert kernel.KernelMerge.resolve(merge_methods.get("slerp"), {"t": 0.5}, ids, 2) is None
    merge = kernel.KernelMerge.resolve(ties, parameters, ids, 2)
    tensors = [torch.randn(8, 6) for _ in ids]
    assert merge([t.double() for t in tensors]) is None
    assert merge([t.T for t in tensors]) is None
    assert merge([t.to("meta") for t in tensors]) is None
    assert merge([t[:1, :1] for t in tensors]) is None
    assert merge(tensors) is not None
    lazy = kernel.AdaptedRows(tensors[0], torch.randn(6, 8).T, 1.0, torch.float32, None)  # fan_in_fan_out's B@A
    assert merge([lazy, *tensors[1:]]) is None
    narrower = kernel.AdaptedRows(tensors[0], torch.randn(8, 6), 1.0, torch.float32, torch.bfloat16)
    assert merge([narrower, *tensors[1:]]) is None  # loaded in bfloat16, merged in float32: two roundings
    monkeypatch.setattr(kernel, "_mergekit_version", lambda: "0.1.6")
    assert kernel.KernelMerge.resolve(ties, parameters, ids, 2) is None


def test_a_failed_build_means_mergekits_code_and_says_why(monkeypatch):
    def no_compiler(flags):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(kernel, "_module", None)
    monkeypatch.setattr(kernel, "_failure", None)
    monkeypatch.setattr(kernel, "_load", no_compiler)
    assert kernel.extension() is None
    assert "c++: command not found" in kernel.status()
    from mergekit import merge_methods

    ids = ["a", "base"]
    merge = kernel.KernelMerge.resolve(merge_methods.get("ties"), {"weight": {"a": 1.0}}, ids, 1)
    assert merge([torch.ones(4), torch.zeros(4)]) is None


def test_the_kernel_is_built_here():
    """CI and this machine have a C++ compiler: the merge runs the kernel, not the fallback."""
    assert kernel.extension() is not None, kernel.status()
    assert kernel.status() == "compiled"
