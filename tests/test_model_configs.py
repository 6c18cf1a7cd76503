"""Every model ftmerge writes carries the target's config.json as it was: transformers 5's `save_pretrained` would
move Qwen2's `rope_theta` into `rope_parameters`, drop `torch_dtype` and null `sliding_window`, and transformers 4.x,
vLLM and llama.cpp's converter would then read rope_theta as 10000. Only the dtype keys and what a merge changes
(vocabulary, layer count) may differ. apply keeps the target's stored dtype unless told otherwise, and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.archive import archive_adapter
from helpers.models import load_model_tensors, make_adapter
from helpers.stages import step_inputs

from pipeline.merging.adapted_model import apply_adapter
from pipeline.merging.output import adopt_target_files
from pipeline.recipe import Recipe
from pipeline.stages import StageRef, apply, merge

DTYPE_KEYS = ("torch_dtype", "dtype")


def hub_config(model_dir: Path, dtype: str) -> dict:
    """A config.json as Qwen2-7B-Instruct has it on the Hub (transformers 4.41 keys), with the tiny model's sizes."""
    tiny = json.loads((model_dir / "config.json").read_text())
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": tiny["bos_token_id"],
        "eos_token_id": tiny["eos_token_id"],
        "hidden_act": "silu",
        "hidden_size": tiny["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": tiny["intermediate_size"],
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": tiny["num_attention_heads"],
        "num_hidden_layers": tiny["num_hidden_layers"],
        "num_key_value_heads": tiny["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": tiny["tie_word_embeddings"],
        "torch_dtype": dtype,
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": tiny["vocab_size"],
    }


def hub_style_copy(model_dir: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The model with a Hub-style config, its weights stored in `dtype`."""
    from safetensors.torch import save_file

    shutil.copytree(model_dir, out_dir)
    for file in out_dir.glob("*.safetensors"):
        save_file({k: v.to(dtype) for k, v in load_model_tensors(out_dir).items()}, file, metadata={"format": "pt"})
    name = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hub_config(model_dir, name), indent=2) + "\n")
    return out_dir


def assert_target_config(out_dir: Path, target_dir: Path, dtype: str | None) -> None:
    """Every key and value of the target's config, in its order; the dtype keys (both) set when `dtype` is."""
    written = json.loads((out_dir / "config.json").read_text())
    expected = json.loads((target_dir / "config.json").read_text())
    if dtype is not None:
        expected.update(torch_dtype=dtype, dtype=dtype)
    assert written == expected
    assert list(written)[: len(expected) - 1] == list(expected)[: len(expected) - 1], "keys keep their order"


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("hub_style")
    base = hub_style_copy(tiny_models["base"], root / "base")
    target = hub_style_copy(tiny_models["target"], root / "target")
    adapter = make_adapter(base, root / "peft" / "alpha")
    archive_adapter(adapter, root / "archive", "alpha", str(base))
    return {
        "base": base,
        "target": target,
        "adapter": adapter,
        "archive": root / "archive",
        "float16_target": hub_style_copy(tiny_models["target"], root / "float16_target", torch.float16),
    }


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float32"])
def test_apply_keeps_the_hub_config(hub_models, tmp_path, dtype):
    apply_adapter(hub_models["adapter"], hub_models["target"], tmp_path, dtype=dtype, device="cpu")
    assert_target_config(tmp_path, hub_models["target"], None if dtype == "auto" else dtype)


@pytest.mark.parametrize("engine", ["mergekit", "fused"])
def test_both_merge_engines_keep_the_target_hub_config(hub_models, tmp_path, engine):
    recipe = Recipe.model_validate(
        {
            "name": "hub-config",
            "base_model": str(hub_models["base"]),
            "target_model": str(hub_models["target"]),
            "output_dir": str(tmp_path / "run"),
            "archive_dir": str(hub_models["archive"]),
            "apply": {"device": "cpu"},
            "merge": {"device": "cpu", "engine": engine, "dtype": "float32"},
        }
    )
    paths = {}
    if engine == "mergekit":
        applied = apply.STAGE.output_path(recipe, "alpha")
        applied.mkdir(parents=True)
        apply.STAGE.run(recipe, "alpha", applied, step_inputs(recipe))
        paths[StageRef("apply", "alpha")] = applied
    out = tmp_path / "merged"
    out.mkdir()
    merge.STAGE.run(recipe, "", out, step_inputs(recipe, paths))
    assert_target_config(out, hub_models["target"], "float32")


def test_only_what_the_merge_changed_is_taken_from_the_engines_config(hub_models, tmp_path):
    """mergekit wrote its config through transformers 5, with the vocabulary rebuilt from tokenizer_source."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hub_models["base"])
    config.vocab_size, config.torch_dtype = 400, "float16"
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in written and written["sliding_window"] is None, "transformers 5 still rewrites it"
    adopt_target_files(tmp_path, hub_models["target"], keep_tokenizer=True)
    result = json.loads((tmp_path / "config.json").read_text())
    expected = {**hub_config(hub_models["target"], "float16"), "dtype": "float16", "vocab_size": 400}
    assert result == expected


def test_apply_keeps_a_float16_target_in_float16_unless_told_and_says_when_it_casts(hub_models, tmp_path):
    target = hub_models["float16_target"]
    kept = apply_adapter(hub_models["adapter"], target, tmp_path / "auto", device="cpu")
    assert "cast" not in kept
    assert {t.dtype for t in load_model_tensors(tmp_path / "auto").values()} == {torch.float16}
    stored = load_model_tensors(target)
    untouched = next(name for name in stored if "norm" in name)
    assert torch.equal(load_model_tensors(tmp_path / "auto")[untouched], stored[untouched])
    cast = apply_adapter(hub_models["adapter"], target, tmp_path / "bf16", dtype="bfloat16", device="cpu")
    assert "float16" in cast["cast"] and "bfloat16" in cast["cast"]
    assert Recipe.model_validate({"name": "x", "base_model": "a/b", "target_model": "c/d"}).apply.dtype == "auto"
