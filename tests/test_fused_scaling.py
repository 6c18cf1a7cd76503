"""The fused merge as the archive grows: each shortcut it takes equals mergekit's result bit for bit (row blocks of
LoRA products, one copy standing for many identical inputs), and its peak memory stays flat in the number of
adapters under a memory budget."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.cli import REPO
from helpers.models import PROJECTIONS, assert_same_tensors, bit_identical
from helpers.stages import merge_with
from safetensors.torch import save_file

from pipeline.demo.tiny import make_tiny_model
from pipeline.merging import fused
from pipeline.merging.kernel import KernelMerge
from pipeline.models.lora import LoraFactors


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize(("rows", "columns", "rank"), [(4864, 896, 64), (896, 4864, 16), (128, 896, 8), (64, 64, 128)])
def test_lora_row_blocks_equal_the_whole_product(rows, columns, rank, fan_in_fan_out):
    """B[rows]@A for every block the engine makes equals the rows of B@A (the product apply and PEFT compute)."""
    generator = torch.Generator().manual_seed(rows + rank)
    lora_A = torch.randn(rank, rows if fan_in_fan_out else columns, generator=generator) * 0.01
    lora_B = torch.randn(columns if fan_in_fan_out else rows, rank, generator=generator) * 0.01
    factors = LoraFactors(lora_A, lora_B, 0.5, fan_in_fan_out)
    whole = factors.delta()
    assert whole.shape == (rows, columns)
    for per_block in (1, 3, 64, 585, rows - 1):
        blocks = fused.row_blocks(rows, per_block)
        assert blocks[0].start == 0 and blocks[-1].stop == rows
        assert all(block.stop - block.start >= fused.MIN_ROWS for block in blocks)
        assert torch.equal(torch.cat([factors.delta(block) for block in blocks]), whole), per_block


def special_values(dtype: torch.dtype, count: int, generator: torch.Generator) -> torch.Tensor:
    """Random deltas' worth of values, with signed zeros, subnormals, infinities and values near overflow first."""
    values = torch.randn(count, generator=generator) * 0.02
    finfo = torch.finfo(dtype)
    special = [
        0.0,
        -0.0,
        finfo.tiny / 4,
        -finfo.tiny / 4,
        finfo.max / 2,
        -finfo.max / 2,
        finfo.max,
        float("inf"),
        -float("inf"),
        1.0,
        -1.0,
        finfo.eps,
    ]
    values[: len(special)] = torch.tensor(special)
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", fused.COPY_METHODS)
def test_copies_of_one_input_merge_as_mergekit_does(method, dtype):
    """Every merged input but the base is one tensor (a weight no adapter touches, the target included): the
    shortcut's result (without the merge kernel) and the kernel's (one source for all of them) equal mergekit's code
    over that many separate copies, for every parameter it reads."""
    from mergekit import merge_methods
    from mergekit.merge_methods.api import merge_tensors

    generator = torch.Generator().manual_seed(0)
    base = special_values(dtype, 4_000, generator)
    value = (base.float() + torch.randn(base.shape, generator=generator) * 0.002).to(dtype)
    value[:12] = base[torch.randperm(12, generator=generator)]
    spec = merge_methods.get(method).spec
    for count, weight, normalize, int8_mask, scale in itertools.product(
        [1, 2, 3, 9, 21], [1.0, 0.3, -0.4, 0.0], [True, False], [True, False], [1.0, 0.7]
    ):
        models = [*range(count), "base"]
        parameters = {
            "normalize": normalize,
            "int8_mask": int8_mask,
            "lambda": scale,
            "weight": dict.fromkeys(models[:-1], weight),
            "density": dict.fromkeys(models[:-1], 1.0),
        }
        if method == "task_arithmetic":
            del parameters["density"]
        expected = merge_tensors(
            [value.clone() for _ in range(count)] + [base], method, parameters=parameters, ids=models, base_index=count
        )
        merge = fused.TensorMerge(merge_methods.get(method), "w", models, parameters, count, elementwise=True)
        assert merge.copies([value] * count + [base]) is not None
        result = fused.merge_copies(spec, base, value, count, weight, parameters)
        assert torch.equal(result.view(torch.int16), expected.view(torch.int16)), (count, weight, normalize, scale)
        by_kernel = KernelMerge.resolve(merge_methods.get(method), parameters, models, count)([value] * count + [base])
        assert bit_identical(by_kernel, expected), (count, weight, normalize, scale)  # the kernel's path for them


def test_copies_shortcut_only_where_it_is_exact():
    """Distinct inputs, distinct weights, float32 and methods whose sums are not of equal terms take mergekit's
    kernel."""
    from mergekit import merge_methods

    value, other = torch.ones(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)
    models = ["a", "b", "base"]

    def copies(method, tensors, weights=(1.0, 1.0)):
        parameters = {"weight": dict(zip(models[:2], weights, strict=True))}
        return fused.TensorMerge(merge_methods.get(method), "w", models, parameters, 2, elementwise=True).copies(
            tensors
        )

    assert copies("ties", [value, value, other]) is not None
    assert copies("ties", [value, value.clone(), other]) is None
    assert copies("ties", [value, value, other], weights=(1.0, 0.5)) is None
    assert copies("ties", [value.float(), value.float(), other.float()]) is None
    assert copies("linear", [value, value, other]) is None


def test_untouched_weights_take_the_shortcut_and_equal_the_mergekit_engine(
    tiny_models,
    archive,
    applied,
    tmp_path,
    monkeypatch,
):
    """End to end without the merge kernel (no compiler): the tiny models' embeddings and norms (no adapter touches
    them) go through `merge_copies`, for TIES and task arithmetic, and the whole merge still equals mergekit's
    engine."""
    from pipeline.merging import kernel

    monkeypatch.setattr(kernel, "extension", lambda: None)
    calls = []
    real = fused.merge_copies
    monkeypatch.setattr(fused, "merge_copies", lambda spec, *args: calls.append(spec.name) or real(spec, *args))
    for settings in ({"method": "ties"}, {"method": "task_arithmetic", "parameters": {"normalize": True}}):
        calls.clear()
        name = settings["method"]
        reference = merge_with(tiny_models, archive, applied, tmp_path / f"m-{name}", "mergekit", **settings)
        merged = merge_with(tiny_models, archive, applied, tmp_path / f"f-{name}", "fused", **settings)
        assert_same_tensors(merged, reference)
        assert calls and set(calls) == {name}


def write_proxy_adapter(out_dir: Path, model_dir: Path, seed: int) -> Path:
    """A PEFT-format LoRA (r=8, random A and B) on every projection of the model, written without loading it."""
    from pipeline.models.safetensors_io import model_tensors

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in model_tensors(model_dir).items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".")[-1] in PROJECTIONS:
            out_features, in_features = info.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, in_features, generator=generator)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, 8, generator=generator)
    out_dir.mkdir(parents=True)
    save_file({key: value * 0.01 for key, value in tensors.items()}, out_dir / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": PROJECTIONS}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


MEASURE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.merging.config import build_mergekit_config, validate_mergekit_config
    from pipeline.merging.fused import FusedOptions, FusedSources, fused_merge
    from pipeline.recipe import MergeConfig

    base, target, out, budget, *adapters = sys.argv[1:]
    adapted = {Path(a).name: str(Path(a).with_suffix(".adapted")) for a in adapters}
    config = validate_mergekit_config(build_mergekit_config(MergeConfig(), adapted, base, target))
    sources = FusedSources(Path(base), Path(target), {Path(a).name: Path(a) for a in adapters}, adapted, "bfloat16")
    fused_merge(config, sources, Path(out), FusedOptions("cpu", memory_budget=int(budget)))
    status = Path("/proc/self/status").read_text().splitlines()
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak RSS from /proc")
def test_peak_memory_is_flat_from_one_to_eight_adapters(tiny_tokenizer_dir, tmp_path):
    """A proxy model whose MLP weights are 16 MB: holding every adapter's whole tensor with the kernel's
    temporaries (as before the budget) would add ~0.8 GB at 8 adapters; under a 64 MB budget the merge of 8
    adapters peaks within 1.25x of the merge of one."""
    models = {
        role: make_tiny_model(
            tmp_path / role,
            tiny_tokenizer_dir,
            hidden_size=1024,
            num_layers=1,
            num_heads=8,
            num_kv_heads=2,
            mlp_ratio=8,
            seed=seed,
        )
        for seed, role in enumerate(["base", "target"])
    }
    adapters = [write_proxy_adapter(tmp_path / f"adapter-{index}", models["base"], seed=index) for index in range(8)]

    def peak(count: int) -> int:
        out = tmp_path / f"out-{count}"
        out.mkdir()
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                MEASURE,
                str(models["base"]),
                str(models["target"]),
                str(out),
                str(64 * 1024**2),
                *map(str, adapters[:count]),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            cwd=REPO,
        )
        return int(result.stdout.strip().splitlines()[-1])

    one, eight = peak(1), peak(8)
    assert eight <= 1.25 * one, f"peak RSS {one / 1e9:.2f} GB with 1 adapter, {eight / 1e9:.2f} GB with 8"
