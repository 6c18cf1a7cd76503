"""merge.moe: a Qwen2-MoE built by mergekit-moe from the archive's adapted models, each expert routed by prompts
sampled from its own fine-tune's prepared data; equal to `mergekit-moe` on the config ftmerge writes, loaded by
transformers (and the evaluate stage's loader) as qwen2_moe. Tiny real models and real PEFT adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.archive import ADAPTERS
from helpers.models import assert_same_tensors, load_model_tensors
from helpers.recipes import merge_recipe
from helpers.stages import applied_inputs, step_inputs

from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import StageRef, merge, search

TASKS = {"alpha": "sort", "beta": "add", "gamma": "reverse"}


def moe_recipe(tiny_models, archive, output_dir, *, own: bool = True, **merge_settings) -> Recipe:
    """alpha, beta and gamma as this recipe's own fine-tunes (`own`), or only as archived adapters."""
    finetunes = [{"name": name, "dataset": {"path": f"data/{name}.jsonl"}} for name in ADAPTERS] if own else []
    merge_settings = {"include_target": False, "moe": {"prompts_per_expert": 3}, **merge_settings}
    return merge_recipe(tiny_models, archive, output_dir, finetunes=finetunes, **merge_settings)


def prepared(root: Path) -> dict[StageRef, Path]:
    """Train splits as the prepare stage saves them (messages and rendered text), one task per fine-tune."""
    from datasets import Dataset

    outputs = {}
    for name, task in TASKS.items():
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"{' '.join('abcdef'[i : i + 3])}\nplease {task}"},
                    {"role": "assistant", "content": "a b c"},
                ],
                "text": "unused",
            }
            for i in range(4)
        ]
        Dataset.from_list(rows).save_to_disk(str(root / name / "train"))
        outputs[StageRef("prepare", name)] = root / name
    return outputs


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tiny_models, archive, applied):
    root = tmp_path_factory.mktemp("moe")
    recipe = moe_recipe(tiny_models, archive, applied)
    merge.check(recipe, "")
    archived = {StageRef("archive", name): archive / name for name in ADAPTERS}
    inputs = step_inputs(recipe, {**applied_inputs(recipe).paths, **prepared(root / "prepare"), **archived})
    assert set(merge.depends_on(recipe, "")) == set(inputs.paths)
    out = root / "merge"
    out.mkdir()
    summary = merge.run(recipe, "", out, inputs)
    return out, summary, root


def test_moe_loads_as_qwen2_moe_with_one_expert_per_adapter_and_generates(tiny_models, applied, moe_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary, _ = moe_run
    assert summary == {"engine": "mergekit-moe", "adapters": list(ADAPTERS), "experts": 3}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]

    tensors = load_model_tensors(out)
    target = load_model_tensors(tiny_models["target"])
    for index, name in enumerate(ADAPTERS):
        adapted = load_model_tensors(applied / "apply" / name)
        for projection in ("gate_proj", "up_proj", "down_proj"):
            expert = tensors[f"model.layers.1.mlp.experts.{index}.{projection}.weight"]
            assert torch.equal(expert, adapted[f"model.layers.1.mlp.{projection}.weight"]), (name, projection)
    assert torch.equal(
        tensors["model.layers.1.mlp.shared_expert.up_proj.weight"], target["model.layers.1.mlp.up_proj.weight"]
    )
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(tensors[name], target[name]), name

    tokenizer, target_tokenizer = (
        AutoTokenizer.from_pretrained(out),
        AutoTokenizer.from_pretrained(tiny_models["target"]),
    )
    assert tokenizer.chat_template == target_tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == target_tokenizer.pad_token  # mergekit-moe saves the base's with pad = bos
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort\nc a b"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_hidden_gate_rows_differ_per_expert_and_prompts_come_from_each_finetunes_data(moe_run):
    out, _, _ = moe_run
    tensors = load_model_tensors(out)
    for layer in (0, 1):
        gate = tensors[f"model.layers.{layer}.mlp.gate.weight"].float()
        assert gate.shape == (3, 64)
        assert all(not torch.allclose(gate[i], gate[j]) for i in range(3) for j in range(i + 1, 3)), layer
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["gate_mode"] == "hidden" and config["architecture"] == "Qwen MoE"
    for expert, (name, task) in zip(config["experts"], TASKS.items(), strict=True):
        assert expert["source_model"].endswith(f"apply/{name}")
        prompts = expert["positive_prompts"]
        assert len(prompts) == 3
        # the system and user turns in the chat template, ended at the user's words
        assert all(p.startswith("<|im_start|>system\n") and "<|im_start|>user\n" in p for p in prompts)
        assert all(p.endswith(f"\nplease {task}") and "<|im_start|>assistant" not in p for p in prompts)
    shared = config["shared_experts"][0]
    assert shared["source_model"] == config["base_model"] and len(shared["positive_prompts"]) == 9
    assert json.loads((out / "lineage.json").read_text())["engine"] == "mergekit-moe"


def test_moe_equals_mergekit_moe_on_the_written_config(moe_run):
    out, _, root = moe_run
    reference = root / "mergekit-moe"
    cli = Path(sys.executable).with_name("mergekit-moe")
    subprocess.run(
        [str(cli), str(out / "mergekit_config.yml"), str(reference), "--device", "cpu", "--random-seed", "0"],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
    )
    assert_same_tensors(out, reference)


def test_evaluate_loads_the_moe_as_the_merged_model(moe_run):
    from pipeline.evaluation.models import ModelSpec, load_causal_lm

    out, _, _ = moe_run
    model = load_causal_lm(ModelSpec("merged", "merged", out), dtype="auto", device=torch.device("cpu"))
    assert model.config.model_type == "qwen2_moe"
    ids = torch.tensor([[1, 5, 9, 12]])
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_random_gate_with_the_target_as_an_expert_and_hand_given_prompts(tiny_models, archive, applied, tmp_path):
    recipe = moe_recipe(
        tiny_models,
        archive,
        applied,
        own=False,
        adapters=["alpha"],
        include_target=True,
        moe={"gate_mode": "random", "experts_per_token": 1},
    )
    merge.check(recipe, "")
    assert merge.depends_on(recipe, "") == [StageRef("apply", "alpha")]  # no prompts to sample
    out = tmp_path / "merge"
    out.mkdir()
    summary = merge.run(recipe, "", out, applied_inputs(recipe))
    assert summary["experts"] == 2
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["experts"][1]["source_model"] == str(tiny_models["target"].resolve())
    assert "positive_prompts" not in config["experts"][0]


def test_moe_settings_are_checked_before_anything_runs(tiny_models, archive, tmp_path):
    def check(**settings):
        merge.check(moe_recipe(tiny_models, archive, tmp_path, **settings), "")

    with pytest.raises(RecipeError, match=r"merge.moe.experts.target.positive_prompts: the target is an expert"):
        check(include_target=True)
    with pytest.raises(RecipeError, match=r"merge.moe.experts.alpha.positive_prompts: alpha was trained by another"):
        merge.check(moe_recipe(tiny_models, archive, tmp_path, own=False), "")
    with pytest.raises(RecipeError, match=r"merge.moe.experts_per_token: 4, but the MoE has 3 expert"):
        check(moe={"experts_per_token": 4})
    with pytest.raises(RecipeError, match=r"merge.moe.experts: \['delta'\] are not experts"):
        check(moe={"experts": {"delta": {"positive_prompts": ["x"]}}})
    with pytest.raises(RecipeError, match=r"fused .* merge.moe need mergekit"):
        check(engine="fused")
    with pytest.raises(RecipeError, match=r"mergekit-moe keeps the target's tokenizer"):
        check(tokenizer={"source": "union"})
    with pytest.raises(ValueError, match=r"a layer-slice merge or a mixture of experts"):
        check(slices=[{"sources": [{"model": "target", "layer_range": [0, 2]}]}])
    searched = moe_recipe(tiny_models, archive, tmp_path)
    with pytest.raises(RecipeError, match=r"cannot run merge.moe \(mergekit only\)"):
        search.check(Recipe.model_validate({**searched.model_dump(), "search": {}}), "")
    check(include_target=True, moe={"experts": {"target": {"positive_prompts": ["hello"]}}})


def test_moe_config_keeps_a_hub_targets_keys_as_they_were(tmp_path):
    """Qwen2-7B-Instruct's config.json has rope_theta at the top level and torch_dtype: the MoE's keeps them (as
    apply and merge outputs do), with mergekit-moe's MoE keys added."""
    from pipeline.merging.moe import write_moe_config

    target, out = tmp_path / "target", tmp_path / "out"
    target.mkdir()
    out.mkdir()
    hub = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0}
    hub |= {"sliding_window": 131072, "use_sliding_window": False, "torch_dtype": "bfloat16", "hidden_size": 3584}
    (target / "config.json").write_text(json.dumps(hub))
    written = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 3584}
    written |= {"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "bfloat16"}
    written |= {
        "sliding_window": None,
        "use_sliding_window": False,
        "num_experts": 4,
        "shared_expert_intermediate_size": 18944,
    }
    (out / "config.json").write_text(json.dumps(written))
    write_moe_config(out, target)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 1000000.0 and "rope_parameters" not in config
    assert config["model_type"] == "qwen2_moe" and config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["num_experts"] == 4 and config["shared_expert_intermediate_size"] == 18944
    assert config["torch_dtype"] == config["dtype"] == "bfloat16" and config["sliding_window"] is None
    assert list(config)[: len(hub)] == list(hub)  # the target's keys first, in its order
