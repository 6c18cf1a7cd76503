"""The fused engine on a GPU moves each distinct tensor to the device once: the weight no adapter touches is one tensor
for every adapter (not N copies), and adapted tensors stay on the device until merged. No GPU here: torch's `meta`
device stands in for it (no data, but every transfer is a real `.to` call that the test counts). The exactness test on
a real GPU is skipped here."""

from __future__ import annotations

import pytest
import torch
from helpers.archive import ADAPTERS


def test_each_distinct_input_goes_to_the_device_once(tiny_models, archive, monkeypatch):
    from pipeline.merging.fused import FusedInputs, FusedOptions, FusedSources
    from pipeline.models.lora import load_adapter

    transfers: list[tuple[int, ...]] = []
    original = torch.Tensor.to

    def counting(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.device.type == "cpu" and result.device.type == "meta":
            transfers.append(tuple(self.shape))
        return result

    adapters = {name: archive / name for name in ADAPTERS}
    adapted = {name: f"/apply/{name}" for name in ADAPTERS}
    sources = FusedSources(tiny_models["base"], tiny_models["target"], adapters, adapted, "bfloat16")
    with FusedInputs(sources, FusedOptions("meta")) as inputs:
        by_name = {item.weight.name: item for item in inputs.planned}
        touched = {name: [a for a in ADAPTERS if name in load_adapter(archive / a).modules] for name in by_name}
        untouched_name = next(name for name, users in touched.items() if not users and by_name[name].base_name)
        partly_name = next(name for name, users in touched.items() if 0 < len(users) < len(ADAPTERS))
        monkeypatch.setattr(torch.Tensor, "to", counting)
        for name in (untouched_name, partly_name):
            transfers.clear()
            values = inputs.role_tensors(by_name[name], torch.bfloat16, with_base=True)
            assert all(value.device.type == "meta" for value in values.values())
            shape = tuple(values["target"].shape)
            full = [t for t in transfers if t == shape]
            # base and target (an untouched adapted tensor in the target's dtype is the target's tensor itself);
            # plus, when an adapter touches it, the target once in float32 for the LoRA sums (each adapted result
            # is made on the device and stays there). Before: one more copy per adapter.
            assert len(full) == (2 if name == untouched_name else 3), (name, transfers)
            sharing = [adapter for adapter in ADAPTERS if adapter not in touched[name]]
            assert {id(values[adapter]) for adapter in sharing} == {id(values["target"])}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; the GPU check runs it)")
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_fused_on_a_gpu_equals_mergekit_on_the_gpu(tiny_models, archive, tmp_path, method):
    """On a GPU the fused engine merges each block with mergekit's own torch code (the one-pass kernel is for the
    CPU), so it equals apply + mergekit's engine run on the same GPU. Never run here: no GPU."""
    from helpers.models import assert_same_tensors
    from helpers.recipes import merge_recipe
    from helpers.stages import applied_inputs, run_stage

    from pipeline.stages import apply, merge

    settings = {"method": method, "device": "cuda", **({"parameters": {"normalize": True}} if method != "ties" else {})}
    recipe = merge_recipe(tiny_models, archive, tmp_path, engine="mergekit", **settings)
    recipe.apply.device = "cuda"
    for name in ADAPTERS:
        run_stage(apply.STAGE, recipe, name)
    outputs = {}
    for engine in ("mergekit", "fused"):
        recipe.merge.engine = engine
        out = tmp_path / f"merge-{engine}"
        out.mkdir()
        merge.run(recipe, "", out, applied_inputs(recipe))
        outputs[engine] = out
    assert_same_tensors(outputs["fused"], outputs["mergekit"])
