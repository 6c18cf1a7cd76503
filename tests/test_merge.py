"""merge: the mergekit engine equals `mergekit-yaml` on the config it writes; the fused engine equals the mergekit
engine; the merged model loads and keeps the target's tokenizer. Tiny real models and real PEFT adapters."""

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
from helpers.archive import ADAPTERS
from helpers.models import assert_same_tensors, load_model_tensors
from helpers.recipes import merge_recipe
from helpers.stages import applied_inputs, merge_with, run_stage

from pipeline.archive.store import file_hashes
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import StageRef, apply, merge


def test_mergekit_engine_equals_mergekit_yaml(tiny_models, archive, applied, tmp_path):
    out = merge_with(tiny_models, archive, applied, tmp_path, "mergekit")
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["merge_method"] == "ties" and config["base_model"] == str(tiny_models["base"].resolve())
    assert [m["model"] for m in config["models"]] == [
        *(str((applied / "apply" / name).resolve()) for name in ADAPTERS),
        str(tiny_models["target"].resolve()),
    ]
    assert all(m["parameters"] == {"weight": 1.0, "density": 1.0} for m in config["models"])
    reference = tmp_path / "mergekit-yaml"
    cli = Path(sys.executable).with_name("mergekit-yaml")
    subprocess.run(
        [str(cli), str(out / "mergekit_config.yml"), str(reference)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
    )
    assert_same_tensors(out, reference)
    lineage = json.loads((out / "lineage.json").read_text())
    assert [a["name"] for a in lineage["adapters"]] == list(ADAPTERS)
    assert all(len(a["sha256"]) == 64 for a in lineage["adapters"])
    assert lineage["mergekit_config"] == config and "mergekit" in lineage["versions"]
    assert "alpha" in (out / "README.md").read_text()


def test_merged_model_loads_with_target_tokenizer_and_generates(tiny_models, archive, applied, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_with(tiny_models, archive, applied, tmp_path, "fused")
    tokenizer, target_tokenizer = (
        AutoTokenizer.from_pretrained(out),
        AutoTokenizer.from_pretrained(tiny_models["target"]),
    )
    assert tokenizer.chat_template == target_tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort\nc a b"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "ties"},
        {"method": "ties", "density": 0.5, "models": {"beta": {"weight": 0.7, "density": 0.8}}},
        {"method": "task_arithmetic", "parameters": {"normalize": False}},
        {"method": "linear", "parameters": {"normalize": True}},
        {"method": "breadcrumbs_ties", "density": 0.9, "parameters": {"gamma": 0.01}},
    ],
    ids=["ties", "ties-density", "task_arithmetic", "linear", "breadcrumbs_ties"],
)
def test_fused_equals_mergekit_engine(tiny_models, archive, applied, tmp_path, settings, monkeypatch):
    """The fused engine's blocks go through the one-pass kernel where it covers the method (TIES and task
    arithmetic at density 1, linear) and through mergekit's own code elsewhere; both equal mergekit's engine."""
    from pipeline.merging import fused, kernel

    monkeypatch.setattr(fused, "CHUNK_BYTES", 4096)  # merge elementwise methods in many row blocks: still identical
    merged_by_kernel = []
    real = kernel.KernelMerge.__call__

    def spy(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        merged_by_kernel.append(result is not None)
        return result

    monkeypatch.setattr(kernel.KernelMerge, "__call__", spy)
    settings = dict(settings)
    if settings.get("method") == "breadcrumbs_ties":
        settings.pop("parameters")
        settings["models"] = {name: {"parameters": {"gamma": 0.01}} for name in ADAPTERS}
    reference = merge_with(tiny_models, archive, applied, tmp_path / "m", "mergekit", **settings)
    merged = merge_with(tiny_models, archive, applied, tmp_path / "f", "fused", **settings)
    assert_same_tensors(merged, reference)
    assert json.loads((merged / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    covered = settings["method"] in ("ties", "task_arithmetic", "linear") and "density" not in settings
    assert (merged_by_kernel and all(merged_by_kernel)) if covered else not merged_by_kernel


def test_check_rejects_bad_merge_settings(tiny_models, archive, tmp_path):
    with pytest.raises(RecipeError, match="not a mergekit merge method"):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, method="tiess"), "")
    with pytest.raises(RecipeError, match=r"merge.parameters: \['epsilon'\] are not parameters of ties"):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, parameters={"epsilon": 0.1}), "")
    with pytest.raises(RecipeError, match="slerp cannot merge these inputs"):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, method="slerp", parameters={"t": 0.5}), "")
    with pytest.raises(RecipeError, match=r"merge.models: \['delta'\]"):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, models={"delta": {"weight": 2}}), "")
    with pytest.raises(RecipeError, match="alpha"):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, adapters=["alpha", "zeta"]), "")


def test_listed_adapter_of_another_base_is_refused_before_anything_runs(tiny_models, archive, tmp_path):
    other_base = {**tiny_models, "base": tiny_models["target"]}  # same shapes: only the manifest tells them apart
    recipe = merge_recipe(other_base, archive, tmp_path, adapters=["alpha"])
    for stage, item in ((apply, "alpha"), (merge, "")):
        with pytest.raises(RecipeError, match=r"alpha \(base .*\) were not trained on this recipe's base_model"):
            stage.check(recipe, item)
    assert merge.check(merge_recipe(tiny_models, archive, tmp_path, adapters=["alpha"]), "") is None


def test_fused_engine_refuses_an_adapter_whose_base_has_another_architecture(tiny_models, archive, tmp_path):
    from pipeline.merging.adapted_model import IncompatibleAdapter

    copied = tmp_path / "archive"
    shutil.copytree(archive, copied)
    manifest = json.loads((copied / "beta" / "manifest.json").read_text())
    manifest["base_config"] = {"model_type": "qwen2", "num_attention_heads": 8}  # the tiny target has 4
    (copied / "beta" / "manifest.json").write_text(json.dumps(manifest))
    recipe = merge_recipe(tiny_models, copied, tmp_path, engine="fused")
    with pytest.raises(IncompatibleAdapter, match="beta: its base has num_attention_heads=8"):
        run_stage(merge.STAGE, recipe, "")
    assert not list(merge.STAGE.output_path(recipe, "").glob("*.safetensors"))


def test_engine_selection_and_dependencies(tiny_models, archive, tmp_path):
    fused = merge_recipe(tiny_models, archive, tmp_path)
    assert merge.depends_on(fused, "") == []  # archived by another recipe: no stage of this one produces them
    assert apply.items(fused) == list(ADAPTERS)  # apply.save defaults to true
    no_save = Recipe.model_validate({**fused.model_dump(), "apply": {"save": False}})
    assert apply.items(no_save) == []
    with_tokenizer = merge_recipe(tiny_models, archive, tmp_path, tokenizer_source="base")
    assert merge.depends_on(with_tokenizer, "") == [StageRef("apply", name) for name in ADAPTERS]
    assert merge.config(fused, "")["adapter_files"]["alpha"] == file_hashes(archive / "alpha")


def test_fused_inputs_equal_apply_outputs_and_share_untouched_weights(tiny_models, archive, applied):
    """The skipped work is provably identical: a weight no adapter touches is the target's tensor in every adapted
    model, so the fused engine hands mergekit one shared tensor instead of copies; touched ones equal apply's."""
    from pipeline.merging.fused import PlannedTensor, tensor_inputs
    from pipeline.models.lora import load_adapter
    from pipeline.models.safetensors_io import TensorReader, model_tensors

    adapters = {name: load_adapter(archive / name) for name in ADAPTERS}
    target = TensorReader(model_tensors(tiny_models["target"]))
    for name in ("model.norm.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        item = PlannedTensor(weight=None, t=0.0, target_name=name, base_name=None)
        inputs = tensor_inputs(
            item,
            None,
            target.read(name),
            {n: n for n in ADAPTERS},
            adapters,
            "bfloat16",
            torch.device("cpu"),
            torch.bfloat16,
        )
        touching = [n for n in ADAPTERS if name in adapters[n].modules]
        untouched = [inputs[n] for n in ADAPTERS if n not in touching]
        assert all(value is untouched[0] for value in untouched)
        for adapter in ADAPTERS:
            applied_tensor = TensorReader(model_tensors(applied / "apply" / adapter)).read(name)
            assert torch.equal(inputs[adapter], applied_tensor), (adapter, name)
    assert "model.layers.0.mlp.up_proj.weight" in adapters["alpha"].modules
    assert "model.layers.0.mlp.up_proj.weight" not in adapters["beta"].modules


def test_default_parameters_are_the_seeds_where_the_method_takes_them(tiny_models, archive, tmp_path):
    from pipeline.merging.config import merge_parameters

    assert merge_parameters(merge_recipe(tiny_models, archive, tmp_path).merge) == {
        "normalize": True,
        "int8_mask": True,
    }
    linear = merge_recipe(tiny_models, archive, tmp_path, method="linear")
    assert merge_parameters(linear.merge) == {"normalize": True}  # linear has no int8_mask
    merge.check(linear, "")
    assert merge_parameters(merge_recipe(tiny_models, archive, tmp_path, parameters={}).merge) == {}


def test_fused_writes_shards_as_they_fill_with_an_index(tiny_models, archive, applied, tmp_path, monkeypatch):
    """A 7B merge spans several shards: the fused engine's sharded output equals the mergekit engine's."""
    from pipeline.merging import fused
    from pipeline.models.safetensors_io import INDEX_FILE

    monkeypatch.setattr(fused, "MAX_SHARD_BYTES", 40_000)
    sharded = merge_with(tiny_models, archive, applied, tmp_path / "f", "fused")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_model_tensors(sharded).values())
    assert_same_tensors(sharded, merge_with(tiny_models, archive, applied, tmp_path / "m", "mergekit"))


def test_tokenizer_source_goes_to_mergekit_and_warns_when_the_vocabulary_shrinks(
    tiny_models, archive, applied, tmp_path, capsys
):
    """The tiny target's embedding has more rows than its tokenizer has tokens (as Qwen2.5's 152064 vs 151665):
    mergekit rebuilds embed_tokens/lm_head to the tokenizer's length, and the summary says so."""
    from transformers import AutoTokenizer

    recipe = merge_recipe(tiny_models, archive, applied, tokenizer_source="target")
    out = tmp_path / "merge"
    out.mkdir()
    merge.check(recipe, "")
    capsys.readouterr()
    summary = merge.run(recipe, "", out, applied_inputs(recipe))
    assert "merge: the merged tokenizer changed the vocabulary size" in capsys.readouterr().out  # a notice
    rows = len(AutoTokenizer.from_pretrained(tiny_models["target"]))
    target_rows = json.loads((tiny_models["target"] / "config.json").read_text())["vocab_size"]
    assert summary["engine"] == "mergekit" and rows < target_rows
    assert f"from {target_rows} (target) to {rows}" in summary["warning"]
    assert load_model_tensors(out)["model.embed_tokens.weight"].shape[0] == rows
    with pytest.raises(RecipeError, match="fused cannot rebuild the vocabulary"):
        merge.check(merge_recipe(tiny_models, archive, applied, tokenizer_source="target", engine="fused"), "")
