"""apply: target + LoRA streamed tensor by tensor equals PEFT's merge_and_unload, bit for bit, on tiny real models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import load_model_tensors, make_adapter
from helpers.references import assert_identical, peft_reference
from safetensors.torch import load_file

from pipeline.demo.tiny import derive_tiny_target, make_tiny_model
from pipeline.merging.adapted_model import IncompatibleAdapter, apply_adapter
from pipeline.models.lora import AdapterRefused, load_adapter
from pipeline.models.safetensors_io import INDEX_FILE, model_tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir):
    """base/target pairs: untied single-file, tied embeddings, and a sharded target."""
    from pipeline.demo.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("apply_models")
    target_tokenizer = build_tokenizer(root / "target_tokenizer", eos_token="<|im_end|>")
    base = make_tiny_model(root / "base", tiny_tokenizer_dir, seed=0)
    tied_base = make_tiny_model(root / "tied_base", tiny_tokenizer_dir, seed=2, tie_word_embeddings=True)
    sharded_target = root / "sharded_target"
    from transformers import AutoModelForCausalLM

    from pipeline.demo.tiny import save_model

    target = derive_tiny_target(base, root / "target", target_tokenizer)
    save_model(
        AutoModelForCausalLM.from_pretrained(target, dtype="auto"),
        target_tokenizer,
        sharded_target,
        max_shard_size="40KB",
    )
    return {
        "base": base,
        "target": target,
        "tied_base": tied_base,
        "tied_target": derive_tiny_target(tied_base, root / "tied_target", target_tokenizer),
        "sharded_target": sharded_target,
    }


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True, "r": 4, "lora_alpha": 8},
        {"rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2}, "alpha_pattern": {"k_proj": 3, "o_proj": 32}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_apply_equals_peft_merge_and_unload(models, tmp_path, lora):
    adapter = make_adapter(models["base"], tmp_path / "adapter", **lora)
    summary = apply_adapter(adapter, models["target"], tmp_path / "ours", dtype="bfloat16", device="cpu")
    assert summary["lora_modules"] == 14
    assert_identical(tmp_path / "ours", peft_reference(models["target"], adapter, tmp_path / "peft"))


def test_apply_tied_embeddings(models, tmp_path):
    adapter = make_adapter(models["tied_base"], tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    apply_adapter(adapter, models["tied_target"], tmp_path / "ours", dtype="bfloat16", device="cpu")
    assert "lm_head.weight" not in model_tensors(tmp_path / "ours")
    assert_identical(tmp_path / "ours", peft_reference(models["tied_target"], adapter, tmp_path / "peft"))


def test_apply_sharded_target_keeps_layout_and_files(models, tmp_path):
    target = models["sharded_target"]
    adapter = make_adapter(models["base"], tmp_path / "adapter")
    out = tmp_path / "ours"
    apply_adapter(adapter, target, out, dtype="bfloat16", device="cpu")
    ours_index, target_index = (json.loads((d / INDEX_FILE).read_text()) for d in (out, target))
    assert len(set(target_index["weight_map"].values())) > 1
    assert ours_index["weight_map"] == target_index["weight_map"]
    assert ours_index["metadata"]["total_size"] == sum(t.nbytes for t in load_model_tensors(out).values())
    assert_identical(out, peft_reference(target, adapter, tmp_path / "peft"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(target).chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == json.loads((target / "generation_config.json").read_text())


def test_apply_float32_output(models, tmp_path):
    adapter = make_adapter(models["base"], tmp_path / "adapter", target_modules=["v_proj"])
    apply_adapter(adapter, models["target"], tmp_path / "ours", dtype="float32", device="cpu")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "float32"
    reference = peft_reference(models["target"], adapter, tmp_path / "peft", dtype=torch.float32)
    assert_identical(tmp_path / "ours", reference)


def test_shape_mismatch_is_reported_before_writing(models, tmp_path, tiny_tokenizer_dir):
    other = make_tiny_model(tmp_path / "wide", tiny_tokenizer_dir, hidden_size=32)
    adapter = make_adapter(other, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        IncompatibleAdapter,
        match=r"model\.layers\.0\.self_attn\.q_proj\.weight is \[64, 64\].*"
        r"\[32, 32\]",
    ):
        apply_adapter(adapter, models["target"], out, device="cpu")
    assert list(out.iterdir()) == []


def test_missing_module_and_architecture_mismatch(models, tmp_path):
    adapter = make_adapter(models["base"], tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(IncompatibleAdapter, match="num_hidden_layers=4"):
        apply_adapter(adapter, models["target"], tmp_path / "a", device="cpu", base_config={"num_hidden_layers": 4})
    weights = adapter / "adapter_model.safetensors"
    from safetensors.torch import save_file

    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in load_file(weights).items()}
    save_file(renamed, weights)
    with pytest.raises(IncompatibleAdapter, match=r"model\.layers\.7\.self_attn\.q_proj\.weight has no tensor"):
        apply_adapter(adapter, models["target"], tmp_path / "b", device="cpu")


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": True}, "biases"),
    ],
)
def test_refusals_name_the_setting_and_why(models, tmp_path, setting, reason):
    adapter = make_adapter(models["base"], tmp_path / "adapter", target_modules=["q_proj", "v_proj"], **setting)
    with pytest.raises(AdapterRefused, match=reason):
        load_adapter(adapter)


def test_embedding_lora_is_refused(models, tmp_path):
    adapter = make_adapter(models["base"], tmp_path / "adapter", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterRefused, match="embedding LoRA"):
        load_adapter(adapter)


def test_truncated_or_garbled_adapter_is_refused_before_writing(models, tmp_path):
    """LoRA matrices are read only when applied, so a cut-off file must be caught when the adapter is opened."""
    adapter = make_adapter(models["base"], tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    weights = adapter / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    with pytest.raises(AdapterRefused, match=r"truncated .* before the data of base_model\.model\..*lora_"):
        apply_adapter(adapter, models["target"], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterRefused, match="not a valid safetensors header"):
        load_adapter(adapter)


def test_fan_in_fan_out_adapter_on_conv1d_weights(tmp_path):
    """GPT-2 stores its projections transposed (Conv1D); PEFT adapters for it set fan_in_fan_out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)
    for seed, name in enumerate(("base", "target")):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(tmp_path / name)
    adapter = make_adapter(
        tmp_path / "base", tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    assert load_adapter(adapter).modules["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    apply_adapter(adapter, tmp_path / "target", tmp_path / "ours", dtype="bfloat16", device="cpu")
    assert_identical(tmp_path / "ours", peft_reference(tmp_path / "target", adapter, tmp_path / "peft"))
