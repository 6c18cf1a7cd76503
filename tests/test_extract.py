"""extract: a tiny "full fine-tune" made by adding a known rank-4 delta to the tiny base's projections is extracted
with mergekit into the archive; the adapter reconstructs the delta as well as any rank-r matrix can, the manifest's
errors are the ones the files give, and the adapter goes through apply → merge like a trained one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.archive.__main__ import main as archive_cli
from pipeline.archive.extract import extract_adapter
from pipeline.archive.store import verify_adapter
from pipeline.run import main as run_pipeline

TRUE_RANK = 4
# bf16 keeps 8 significant bits: rounding A and B each moves B@A by at most about 2·2^-9 of its norm. The only
# other error is what no rank-r matrix can capture (Eckart–Young), which the tests compute from the stored delta.
FACTOR_ROUNDING = 2**-7
CHANGED_ELSEWHERE = ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias")


def make_finetune(base_dir, out_dir, seed=0):
    """The base with W += U@V (rank 4, about half the weights' scale) on every projection, plus changes to a norm,
    the embeddings and a bias, which extraction must leave out (and report)."""
    tensors = load_file(base_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            rows, columns = tensor.shape
            delta = torch.randn(rows, TRUE_RANK, generator=generator) @ torch.randn(
                TRUE_RANK, columns, generator=generator
            )
            tensors[name] = (tensor.float() + 0.005 * delta).to(tensor.dtype)
        elif name in CHANGED_ELSEWHERE:
            tensors[name] = tensor + 0.01
    out_dir.mkdir(parents=True)
    for file in base_dir.iterdir():
        if file.name != "model.safetensors":
            shutil.copy2(file, out_dir / file.name)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def stored_deltas(finetune_dir, base_dir) -> dict[str, torch.Tensor]:
    finetuned, base = load_file(finetune_dir / "model.safetensors"), load_file(base_dir / "model.safetensors")
    return {name: finetuned[name].float() - base[name].float() for name in base if name.endswith("proj.weight")}


def best_possible_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young: the smallest ||D - X|| / ||D|| over matrices X of rank `rank`."""
    singular_values = torch.linalg.svdvals(delta)
    return (singular_values[rank:].square().sum().sqrt() / singular_values.square().sum().sqrt()).item()


def errors_from_files(adapter_dir, deltas) -> dict[str, float]:
    """||D - scale·B@A|| / ||D|| recomputed here from the archived files, independently of the stage's code."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    errors = {}
    for weight_name, delta in deltas.items():
        module = weight_name.removesuffix(".weight")
        rank = config["rank_pattern"].get(module, config["r"])
        scale = config["alpha_pattern"].get(module, config["lora_alpha"]) / rank
        a = weights[f"base_model.model.{module}.lora_A.weight"].float()
        b = weights[f"base_model.model.{module}.lora_B.weight"].float()
        errors[module] = ((delta - scale * b @ a).norm() / delta.norm()).item()
    return errors


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("extract")
    finetune = make_finetune(tiny_models["base"], root / "finetune")
    archive = root / "archive"
    path, written = extract_adapter(
        archive,
        str(finetune),
        str(tiny_models["base"]),
        "extracted",
        rank=8,
        target_model=str(tiny_models["target"]),
        device="cpu",
    )
    assert written
    return {
        "root": root,
        "finetune": finetune,
        "archive": archive,
        "adapter": path,
        "deltas": stored_deltas(finetune, tiny_models["base"]),
    }


def test_extracted_adapter_reconstructs_the_finetune(extracted, tiny_models):
    manifest = verify_adapter(extracted["adapter"])
    assert manifest["kind"] == "extracted" and manifest["base_model"] == str(tiny_models["base"])
    extraction = manifest["extraction"]
    assert extraction["model"] == str(extracted["finetune"]) and extraction["rank"] == 8
    recomputed = errors_from_files(extracted["adapter"], extracted["deltas"])
    assert sorted(extraction["reconstruction_error"]) == sorted(recomputed)  # every projection, nothing else
    for module, error in recomputed.items():
        assert extraction["reconstruction_error"][module] == pytest.approx(error, abs=1e-5), module
        best = best_possible_error(extracted["deltas"][f"{module}.weight"], 8)
        assert error <= best + FACTOR_ROUNDING, f"{module}: {error:.4f} vs best rank-8 {best:.4f}"
    assert extraction["reconstruction_error_max"] < 0.02
    config = json.loads((extracted["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_models["base"]) and not config["modules_to_save"]


def test_embeddings_norms_and_biases_are_left_out_and_reported(extracted):
    keys = load_file(extracted["adapter"] / "adapter_model.safetensors")
    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)
    assert not any(part in key for key in keys for part in ("embed_tokens", "norm", "lm_head", "bias"))
    left_out = verify_adapter(extracted["adapter"])["extraction"]["left_out"]
    assert sorted(left_out) == sorted(CHANGED_ELSEWHERE)
    assert all(change["delta_norm"] > 0 for change in left_out.values())


def test_lower_rank_error_is_what_the_discarded_singular_values_hold(extracted, tiny_models):
    path, _ = extract_adapter(
        extracted["archive"], str(extracted["finetune"]), str(tiny_models["base"]), "rank-two", rank=2, device="cpu"
    )
    errors = verify_adapter(path)["extraction"]["reconstruction_error"]
    for module, error in errors.items():
        best = best_possible_error(extracted["deltas"][f"{module}.weight"], 2)
        assert best > 0.2  # a rank-4 delta truncated to rank 2 loses a lot: the bound below is not vacuous
        assert best <= error + 1e-6 and error <= best + FACTOR_ROUNDING, module


def test_extracting_again_is_a_no_op(extracted, tiny_models, capsys):
    """The same fine-tune at the same rank gives the same bytes, so the append-only archive accepts it as done
    (a conflicting name is tested with `add` in test_archive_cli.py: it is the same store function)."""
    args = [
        "extract",
        str(extracted["archive"]),
        "--model",
        str(extracted["finetune"]),
        "--base",
        str(tiny_models["base"]),
        "--rank",
        "8",
        "--name",
        "extracted",
        "--device",
        "cpu",
    ]
    before = (extracted["adapter"] / "manifest.json").read_bytes()
    assert archive_cli(args) == 0
    assert "already archived with identical files" in capsys.readouterr().out
    assert (extracted["adapter"] / "manifest.json").read_bytes() == before


def test_extracted_adapter_goes_through_apply_and_merge(extracted, tiny_models):
    output_dir = extracted["root"] / "run"
    recipe = {
        "name": "extracted-merge",
        "output_dir": str(output_dir),
        "base_model": str(tiny_models["base"]),
        "target_model": str(tiny_models["target"]),
        "archive_dir": str(extracted["archive"]),
        "apply": {"device": "cpu"},
        "merge": {"adapters": ["extracted"], "device": "cpu"},
        "evaluate": {"enabled": False},
    }
    recipe_file = extracted["root"] / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert run_pipeline([str(recipe_file), "--from", "apply"]) == 0
    adapted = load_file(output_dir / "apply" / "extracted" / "model.safetensors")
    target = load_file(tiny_models["target"] / "model.safetensors")
    for name, delta in extracted["deltas"].items():  # the fine-tune's change, carried onto the target
        moved = adapted[name].float() - target[name].float()
        assert ((moved - delta).norm() / delta.norm()).item() < 0.05, name
    lineage = json.loads((output_dir / "merge" / "lineage.json").read_text())
    manifest = verify_adapter(extracted["adapter"])
    assert [a["name"] for a in lineage["adapters"]] == ["extracted"]
    assert lineage["adapters"][0]["sha256"] == manifest["files"]["adapter_model.safetensors"]
    assert (output_dir / "merge" / "model.safetensors").is_file()
