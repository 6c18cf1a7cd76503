"""The tiny models other tests build on: real files that transformers loads, with the tokens the recipe relies on."""

import json
import random

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.demo.lineage import DISTANCE_FILE, build_demo_assets, instruct_distance
from pipeline.demo.synthetic import (
    DEMO_DATA_DIR,
    DOMAINS,
    EVERYDAY_SKILLS,
    FINETUNE_SETS,
    GENERAL_PROMPTS,
    NOTATION,
    UNNAMED_WORDS,
    fresh_examples,
    is_held_out,
    word_corpus,
    write_demo_sets,
)
from pipeline.demo.tiny import QWEN2_CHAT_TEMPLATE, build_word_tokenizer


def test_tokenizers_have_chatml_tokens_and_the_right_eos(tiny_models):
    base = AutoTokenizer.from_pretrained(tiny_models["base"])
    target = AutoTokenizer.from_pretrained(tiny_models["target"])
    assert base.eos_token == "<|endoftext|>" and target.eos_token == "<|im_end|>"
    assert base.pad_token == target.pad_token == "<|endoftext|>"
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = base.encode(f"a {token} b", add_special_tokens=False)
        assert base.convert_tokens_to_ids(token) in ids, f"{token} is not a single special token"
    assert target.chat_template == QWEN2_CHAT_TEMPLATE
    assert 300 <= len(base) <= 600


def test_models_load_generate_and_target_derives_from_base(tiny_models):
    base = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype="auto")
    target = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype="auto")
    assert base.dtype == torch.bfloat16 and base.config.vocab_size >= len(
        AutoTokenizer.from_pretrained(tiny_models["base"])
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["target"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "copy\na b"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = target.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    generation = json.loads((tiny_models["target"] / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    base_weights = load_file(tiny_models["base"] / "model.safetensors")
    target_weights = load_file(tiny_models["target"] / "model.safetensors")
    assert base_weights.keys() == target_weights.keys()
    delta = (target_weights["model.norm.weight"].float() - base_weights["model.norm.weight"].float()).abs()
    assert 0 < delta.max() < 0.1


def test_shipped_demo_data_is_the_generators_output(tmp_path):
    written = write_demo_sets(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in DEMO_DATA_DIR.iterdir())
    for path in written:
        assert path.read_bytes() == (DEMO_DATA_DIR / path.name).read_bytes(), f"regenerate {path.name}"
    copy = [json.loads(line)["messages"] for line in (tmp_path / "copy.messages.jsonl").read_text().splitlines()]
    assert all(c[1]["content"] == c[0]["content"].split("\n")[1] for c in copy) and len(copy) == 100


def test_fresh_examples_are_held_out_from_every_training_set(finetune_sets):
    """Fine-tune sets train on one side of the split; fresh examples and the retention set test on the other."""

    def listed(conversation):
        return conversation[0]["content"].split("\n")[1].split()

    fresh = fresh_examples("sort", 50, seed=1)
    assert len(fresh) == 50 and fresh != fresh_examples("sort", 50, seed=2)
    assert all(is_held_out(listed(c)) for c in fresh)
    assert all(c[1]["content"].split() == sorted(listed(c)) for c in fresh)
    rows = [json.loads(line) for line in (finetune_sets / "reverse.alpaca.jsonl").read_text().splitlines()]
    assert not any(is_held_out(row["input"].split()) for row in rows)
    retention = [json.loads(line)["messages"] for line in (DEMO_DATA_DIR / "copy.messages.jsonl").open()]
    assert all(is_held_out(listed(c)) for c in retention)


def test_word_tokenizer_gives_each_letter_and_instruction_one_token(tmp_path):
    tokenizer_dir = build_word_tokenizer(tmp_path, word_corpus(random.Random(0)), eos_token="<|im_end|>")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "reverse\nc a b"}, {"role": "assistant", "content": "b a c"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[-17:] == [
        "user",
        "Ċ",
        "reverse",
        "Ċ",
        "c",
        "Ġa",
        "Ġb",
        "<|im_end|>",
        "Ċ",
        "<|im_start|>",
        "assistant",
        "Ċ",
        "b",
        "Ġa",
        "Ġc",
        "<|im_end|>",
        "Ċ",
    ]
    assert tokenizer.decode(ids[-5:-1], skip_special_tokens=True) == "b a c"


def test_demo_assets_are_cached_and_rebuilt_when_settings_change(tmp_path):
    paths = build_demo_assets(tmp_path / "demo", steps=2)
    assert AutoTokenizer.from_pretrained(paths["target"]).eos_token == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(paths["base"]).eos_token == "<|endoftext|>"
    weights = paths["target"] / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_demo_assets(tmp_path / "demo", steps=2) == paths and weights.stat().st_mtime_ns == stamp
    build_demo_assets(tmp_path / "demo", steps=3)
    assert weights.stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_the_demo_target_differs_from_the_base_in_every_tensor(tmp_path):
    paths = build_demo_assets(tmp_path / "demo", steps=40)  # the target's tune: 4 steps, the first at warm-up lr 0
    distance = instruct_distance(paths["base"], paths["target"])
    assert json.loads((tmp_path / "demo" / DISTANCE_FILE).read_text()) == distance
    names = list(load_file(paths["base"] / "model.safetensors"))
    assert distance["tensors"] == len(names) and distance["relative_distance"] > 0
    # 3 steps at 1e-4 move every projection and the embeddings; a norm's weights (about 1, a bfloat16 step of 2^-8
    # there) move in the real build's 200 steps, which tests/test_demo_lineage.py checks
    assert not [name for name in distance["unchanged"] if "norm" not in name], distance["unchanged"]
    assert 0 < distance["outside_embeddings"] < 1


def test_fine_tune_sets_hold_their_skill_and_the_general_prompts_what_the_replay_asks(finetune_sets):
    for name, (skill, data_format, rows, _) in FINETUNE_SETS.items():
        written = [json.loads(line) for line in (finetune_sets / name).read_text().splitlines()]
        if data_format == "alpaca":
            written = [{"messages": [{"content": f"{r['instruction']}\n{r['input']}"}]} for r in written]
        assert len(written) == rows
        for row in written:
            instruction, words = row["messages"][0]["content"].split("\n")
            assert instruction == skill and set(words.split()) <= set(DOMAINS[skill])
    name, rows, _, known = GENERAL_PROMPTS
    prompts = [json.loads(line)["messages"] for line in (DEMO_DATA_DIR / name).read_text().splitlines()]
    assert len(prompts) == rows and all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
    instructions = [p[0]["content"].split("\n")[0] for p in prompts]
    unnamed = [i for i in instructions if i in UNNAMED_WORDS]
    assert abs(len(unnamed) / rows - (1 - known)) < 0.03
    assert set(instructions) - set(UNNAMED_WORDS) == set(EVERYDAY_SKILLS) | set(NOTATION.values())
    assert set(unnamed) == set(UNNAMED_WORDS)
    assert not any(is_held_out(p[0]["content"].split("\n")[1].split()) for p in prompts), "training lists only"
