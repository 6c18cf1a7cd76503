"""combine: archived adapters combined with PEFT's add_weighted_adapter equal the same call made by hand, tensor for
tensor, and the result is an archived adapter that apply accepts."""

from __future__ import annotations

import pytest
import torch
from helpers.models import make_adapter
from safetensors.torch import load_file

from pipeline.archive.__main__ import main as archive_cli
from pipeline.archive.combine import combine_adapters
from pipeline.archive.importing import import_adapter
from pipeline.archive.store import ArchiveError, verify_adapter
from pipeline.models.lora import load_adapter

WEIGHTS = [0.6, 0.4]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("combine")
    base = str(tiny_models["base"])
    import_adapter(root / "archive", make_adapter(tiny_models["base"], root / "a", seed=0), "a", base)
    import_adapter(
        root / "archive",
        make_adapter(tiny_models["base"], root / "b", seed=1, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b.v2",
        base,
    )
    import_adapter(
        root / "archive",
        make_adapter(tiny_models["base"], root / "c", seed=3, r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
        "c.r4",
        base,
    )
    import_adapter(
        root / "archive",
        make_adapter(tiny_models["target"], root / "t", seed=2),
        "on-target",
        str(tiny_models["target"]),
    )
    return root / "archive"


def combined_by_hand(archive, base_dir, method, density):
    """What a PEFT user writes, without ftmerge."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto"), archive / "a", adapter_name="first"
    )
    model.load_adapter(archive / "b.v2", adapter_name="second")
    model.add_weighted_adapter(["first", "second"], WEIGHTS, "mix", combination_type=method, density=density)
    return get_peft_model_state_dict(model, adapter_name="mix")


@pytest.mark.parametrize(("method", "density"), [("linear", None), ("cat", None), ("ties", 0.5), ("svd", None)])
def test_combine_equals_peft_by_hand(archive, tiny_models, method, density):
    name = f"mix-{method}"
    args = [
        "combine",
        str(archive),
        "--adapters",
        "a,b.v2",
        "--weights",
        "0.6,0.4",
        "--method",
        method,
        "--name",
        name,
    ] + (["--density", str(density)] if density else [])
    assert archive_cli(args) == 0
    ours = load_file(archive / name / "adapter_model.safetensors")
    reference = combined_by_hand(archive, tiny_models["base"], method, density)
    assert sorted(ours) == sorted(reference)
    for key, tensor in reference.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    manifest = verify_adapter(archive / name)
    assert manifest["kind"] == "combined" and manifest["base_model"] == str(tiny_models["base"])
    combination = manifest["combination"]
    assert combination["combination_type"] == method and combination["density"] == density
    assert [(s["name"], s["weight"], s["kind"]) for s in combination["sources"]] == [
        ("a", 0.6, "imported"),
        ("b.v2", 0.4, "imported"),
    ]
    assert combination["sources"][0]["files"] == verify_adapter(archive / "a")["files"]
    assert len(load_adapter(archive / name).modules) == 14  # apply reads it: the union of both adapters' modules


def test_adapters_of_different_bases_are_not_combined(archive):
    with pytest.raises(ArchiveError, match="different bases cannot be combined"):
        combine_adapters(archive, ["a", "on-target"], WEIGHTS, "mixed-bases")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "0.6", "--method", "linear"], "1 weights for 2 adapters"),
        (["--weights", "0.6,0.4", "--method", "ties"], "give --density"),
        (["--weights", "0.6,0.4", "--method", "average"], "not a PEFT combination_type"),
    ],
)
def test_bad_requests_are_refused_before_loading_anything(archive, capsys, extra, message):
    assert archive_cli(["combine", str(archive), "--adapters", "a,b.v2", "--name", "bad", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (archive / "bad").exists()


def weighted_sum(archive, names, weights) -> dict[str, torch.Tensor]:
    """Σ wᵢ·sᵢ·BᵢAᵢ per module, computed here from PEFT's own layer (`get_delta_weight`) of each source."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    total = {}
    for name, weight in zip(names, weights, strict=True):
        base = AutoModelForCausalLM.from_pretrained(load_adapter(archive / name).config["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, archive / name, adapter_name="one")
        for module_name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "one" in getattr(module, "lora_A", {}):
                key = module_name.removeprefix("base_model.model.") + ".weight"
                total[key] = total.get(key, 0) + weight * module.get_delta_weight("one").float()
    return total


def combined_update(path) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in load_adapter(path).modules.items()}


def test_the_default_is_the_exact_weighted_sum_of_the_updates_for_different_ranks_too(archive):
    """PEFT's `linear` gives (Σ√wᵢBᵢ)(Σ√wᵢsᵢAᵢ), cross terms included, and refuses ranks 8 and 4; the default does
    not: its update is Σ wᵢ·sᵢ·BᵢAᵢ per module, whatever the sources' ranks: exactly with `--dtype float32`, within the
    bf16 rounding of the factors with the tiny base's own bf16 (what PEFT stores), and the manifest says which."""
    args = ["combine", str(archive), "--adapters", "a,c.r4", "--weights", "0.6,0.4"]
    assert archive_cli([*args, "--dtype", "float32", "--name", "sum"]) == 0
    assert archive_cli([*args, "--name", "sum-bf16"]) == 0
    expected = weighted_sum(archive, ["a", "c.r4"], WEIGHTS)
    for name, tolerance in (("sum", 1e-5), ("sum-bf16", 1e-2)):
        got = combined_update(archive / name)
        assert sorted(got) == sorted(expected)
        worst = max(float(torch.linalg.norm(got[k] - t) / torch.linalg.norm(t)) for k, t in expected.items())
        combination = verify_adapter(archive / name)["combination"]
        assert combination["combination_type"] == "cat" and worst < tolerance, (name, worst)
        assert combination["reconstruction_error_max"] == pytest.approx(worst, rel=1e-3, abs=1e-7)
        assert load_adapter(archive / name).config["r"] == 12  # 8 + 4
    assert verify_adapter(archive / "sum")["combination"]["dtype"] == "float32"


def test_the_manifest_says_how_far_linear_and_svd_are_from_the_weighted_sum(archive):
    args = ["combine", str(archive), "--adapters", "a,b.v2", "--weights", "0.6,0.4"]
    assert archive_cli([*args, "--method", "linear", "--name", "lin"]) == 0
    assert archive_cli([*args, "--method", "svd", "--svd-rank", "2", "--name", "svd2"]) == 0
    expected = weighted_sum(archive, ["a", "b.v2"], WEIGHTS)
    for name, low, high in (("lin", 0.5, 2.0), ("svd2", 1e-3, 1.0)):
        recorded = verify_adapter(archive / name)["combination"]["reconstruction_error_max"]
        got = combined_update(archive / name)
        worst = max(float(torch.linalg.norm(got[k] - t) / torch.linalg.norm(t)) for k, t in expected.items())
        assert recorded == pytest.approx(worst, rel=1e-4) and low < recorded < high, (name, recorded)
