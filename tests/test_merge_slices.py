"""merge.slices and merge.tokenizer: layer-slice merges (passthrough "frankenmerges" and per-tensor methods over
slices) and mergekit's tokenizer block, run on the mergekit engine over the apply stage's outputs; each equals
`mergekit-yaml` on the `mergekit_config.yml` it writes. Tiny real models and real PEFT adapters."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers.archive import ADAPTERS
from helpers.cli import run_cli
from helpers.models import assert_same_tensors, layer_tensors, load_model_tensors
from helpers.recipes import RETENTION, SEARCH, merge_recipe, write_pipeline_recipe
from helpers.references import mergekit_yaml
from helpers.stages import applied_inputs

from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import StageRef, merge, search

FRANKENMERGE = [
    {"sources": [{"model": "target", "layer_range": [0, 1]}]},
    {"sources": [{"model": "alpha", "layer_range": [1, 2]}]},
    {"sources": [{"model": "beta", "layer_range": [0, 2]}]},
    {"sources": [{"model": "target", "layer_range": [1, 2]}]},
]


def merge_into(tiny_models, archive, applied, out: Path, **settings) -> tuple[Path, dict]:
    recipe = merge_recipe(tiny_models, archive, applied, **settings)
    out.mkdir(parents=True)
    merge.check(recipe, "")
    return out, merge.run(recipe, "", out, applied_inputs(recipe))


def test_passthrough_slices_take_each_layer_from_the_named_source_and_equal_mergekit_yaml(
    tiny_models, archive, applied, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = merge_into(
        tiny_models, archive, applied, tmp_path / "merge", method="passthrough", slices=FRANKENMERGE
    )
    assert summary["engine"] == "mergekit" and summary["adapters"] == ["alpha", "beta"]
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["slices"][1]["sources"] == [
        {"model": str((applied / "apply" / "alpha").resolve()), "layer_range": [1, 2]}
    ]
    # mergekit 0.1.5 under transformers 5.17 cannot save a config whose layer count changed (layer_types)
    with pytest.raises(subprocess.CalledProcessError) as failed:
        mergekit_yaml(out / "mergekit_config.yml", tmp_path / "plain")
    assert "must be equal to the number of `layer_types`" in failed.value.stderr
    reference = mergekit_yaml(out / "mergekit_config.yml", tmp_path / "reference", fixed_layer_types=True)
    assert_same_tensors(out, reference)

    merged = load_model_tensors(out)
    sources = {
        "target": load_model_tensors(tiny_models["target"]),
        **{name: load_model_tensors(applied / "apply" / name) for name in ("alpha", "beta")},
    }
    # output layer → (source, source layer): target's first and last layers around alpha's 1 and beta's 0..1
    for layer, (source, source_layer) in enumerate(
        [("target", 0), ("alpha", 1), ("beta", 0), ("beta", 1), ("target", 1)]
    ):
        expected = layer_tensors(sources[source], source_layer)
        got = layer_tensors(merged, layer)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[name], expected[name]) for name in expected), (layer, source)
    assert not any(name.startswith("model.layers.5.") for name in merged)
    assert torch.equal(merged["model.embed_tokens.weight"], sources["target"]["model.embed_tokens.weight"])

    written = json.loads((out / "config.json").read_text())
    target_config = json.loads((tiny_models["target"] / "config.json").read_text())
    assert written["num_hidden_layers"] == 5 and len(written.get("layer_types", [None] * 5)) == 5
    patched = ("num_hidden_layers", "layer_types", "dtype", "torch_dtype")
    assert {k: v for k, v in written.items() if k not in patched} == {
        k: v for k, v in target_config.items() if k not in patched
    }
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_models["target"]).chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5
    prompt = tokenizer("sort c a b", return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]


def test_slices_keeping_the_layer_count_equal_plain_mergekit_yaml(tiny_models, archive, applied, tmp_path):
    slices = [FRANKENMERGE[0], {"sources": [{"model": "gamma", "layer_range": [1, 2]}]}]
    out, _ = merge_into(tiny_models, archive, applied, tmp_path / "merge", method="passthrough", slices=slices)
    assert_same_tensors(out, mergekit_yaml(out / "mergekit_config.yml", tmp_path / "reference"))
    gamma = load_model_tensors(applied / "apply" / "gamma")
    merged = load_model_tensors(out)
    assert all(torch.equal(t, layer_tensors(gamma, 1)[n]) for n, t in layer_tensors(merged, 1).items())


def test_ties_over_slices_with_per_source_parameters_equals_mergekit_yaml(tiny_models, archive, applied, tmp_path):
    slices = [
        {
            "sources": [
                {"model": "base", "layer_range": [0, 2]},
                {"model": "alpha", "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.7}},
                {"model": "gamma", "layer_range": [0, 2]},
                {"model": "target", "layer_range": [0, 2]},
            ]
        }
    ]
    out, _ = merge_into(tiny_models, archive, applied, tmp_path / "merge", method="ties", slices=slices)
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["base_model"] == str(tiny_models["base"].resolve())
    parameters = [source.get("parameters") for source in config["slices"][0]["sources"]]
    assert parameters[1] == {"weight": 0.5, "density": 0.7} and parameters[2] == {"weight": 1.0, "density": 1.0}
    assert_same_tensors(out, mergekit_yaml(out / "mergekit_config.yml", tmp_path / "reference"))


def test_slices_are_checked_before_anything_runs(tiny_models, archive, tmp_path):
    def check(slices, **settings):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, method="passthrough", slices=slices, **settings), "")

    with pytest.raises(RecipeError, match=r"merge.slices.1.sources.0.model: 'zeta' is not base, target or a merged"):
        check([FRANKENMERGE[0], {"sources": [{"model": "zeta", "layer_range": [0, 1]}]}])
    with pytest.raises(RecipeError, match=r"merge.slices.0: layer_range \[1, 3\] of .* outside the model's 2 layers"):
        check([{"sources": [{"model": "alpha", "layer_range": [1, 3]}]}])
    with pytest.raises(RecipeError, match=r"fused .* merge.slices need mergekit"):
        check(FRANKENMERGE, engine="fused")
    with pytest.raises(ValueError, match="is not a layer range"):  # the schema's
        check([{"sources": [{"model": "alpha", "layer_range": [1, 1]}]}])
    with pytest.raises(RecipeError, match="same number of layers"):
        merge.check(
            merge_recipe(
                tiny_models,
                archive,
                tmp_path,
                method="linear",
                slices=[
                    {
                        "sources": [
                            {"model": "alpha", "layer_range": [0, 1], "parameters": {"weight": 1}},
                            {"model": "beta", "layer_range": [0, 2], "parameters": {"weight": 1}},
                        ]
                    }
                ],
            ),
            "",
        )
    assert check(FRANKENMERGE) is None
    recipe = merge_recipe(tiny_models, archive, tmp_path, method="passthrough", slices=FRANKENMERGE)
    assert merge.depends_on(recipe, "") == [StageRef("apply", "alpha"), StageRef("apply", "beta")]


def test_search_refuses_mergekit_only_keys(tiny_models, archive, tmp_path):
    recipe = merge_recipe(tiny_models, archive, tmp_path, method="passthrough", slices=FRANKENMERGE)
    searched = Recipe.model_validate({**recipe.model_dump(), "search": {}})
    with pytest.raises(RecipeError, match=r"search: .* cannot run merge.slices \(mergekit only\)"):
        search.check(searched, "")


def test_tokenizer_block_goes_to_mergekit_names_models_and_warns_with_both_sizes(
    tiny_models, archive, applied, tmp_path
):
    from transformers import AutoTokenizer

    target_rows = json.loads((tiny_models["target"] / "config.json").read_text())["vocab_size"]
    rows = len(AutoTokenizer.from_pretrained(tiny_models["target"]))
    block = {"source": "union", "tokens": {"<|im_end|>": {"source": "alpha"}}}
    out, summary = merge_into(tiny_models, archive, applied, tmp_path / "union", tokenizer=block)
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    alpha = str((applied / "apply" / "alpha").resolve())
    assert config["tokenizer"] == {"source": "union", "tokens": {"<|im_end|>": {"source": alpha}}}
    assert summary["engine"] == "mergekit"
    assert f"from {target_rows} (target) to {rows}" in summary["warning"]
    assert_same_tensors(out, mergekit_yaml(out / "mergekit_config.yml", tmp_path / "reference"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    embedding = load_model_tensors(out)["model.embed_tokens.weight"]
    alpha_id = AutoTokenizer.from_pretrained(applied / "apply" / "alpha").convert_tokens_to_ids("<|im_end|>")
    assert torch.equal(
        embedding[im_end], load_model_tensors(applied / "apply" / "alpha")["model.embed_tokens.weight"][alpha_id]
    )

    padded, summary = merge_into(
        tiny_models, archive, applied, tmp_path / "padded", tokenizer={"source": "target", "pad_to_multiple_of": 64}
    )
    assert "warning" not in summary
    assert load_model_tensors(padded)["model.embed_tokens.weight"].shape[0] == target_rows


def test_tokenizer_keys_are_checked(tiny_models, archive, tmp_path):
    with pytest.raises(RecipeError, match=r"merge.tokenizer.source: 'zeta' is not base, target or a merged adapter"):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, tokenizer={"source": "zeta"}), "")
    with pytest.raises(ValueError, match=r"tokenizer_source and merge.tokenizer: give one"):
        merge_recipe(tiny_models, archive, tmp_path, tokenizer={"source": "union"}, tokenizer_source="base")
    with pytest.raises(RecipeError, match=r"fused .* merge.tokenizer need mergekit"):
        merge.check(merge_recipe(tiny_models, archive, tmp_path, tokenizer={"source": "union"}, engine="fused"), "")
    recipe = merge_recipe(tiny_models, archive, tmp_path, tokenizer={"source": "base"})
    assert merge.depends_on(recipe, "") == [StageRef("apply", name) for name in ADAPTERS]


def test_a_search_with_slices_or_a_moe_exits_2_naming_the_key(tiny_models, finetune_sets, tmp_path):
    cases = {
        "merge.slices": {"method": "passthrough", "slices": [{"sources": [{"model": "sort", "layer_range": [0, 2]}]}]},
        "merge.moe": {"moe": {}, "include_target": False},
    }
    for key, settings in cases.items():
        directory = tmp_path / key
        directory.mkdir()
        evaluate = {"max_samples": 8, **RETENTION}
        recipe = write_pipeline_recipe(
            directory, tiny_models, finetune_sets, merge=settings, search=SEARCH, evaluate=evaluate
        )
        result = run_cli(recipe, "--dry-run")
        assert result.returncode == 2, (key, result.stdout, result.stderr)
        assert f"cannot run {key} (mergekit only)" in result.stderr, result.stderr
