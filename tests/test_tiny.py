"""The tiny models other tests build on: real files that transformers loads, with the tokens the recipe relies on."""

import json
import random

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.demo.lineage import build_demo_assets, chat_answers
from pipeline.demo.synthetic import (
    DEMO_DATA_DIR,
    DOMAINS,
    EVERYDAY_SKILLS,
    FINETUNE_MIX,
    FINETUNE_SETS,
    NOTATION,
    UNNAMED_WORDS,
    demo_rows,
    fresh_examples,
    is_held_out,
    word_corpus,
    write_retention_set,
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


def test_shipped_retention_set_is_the_generators_output(tmp_path):
    written = write_retention_set(tmp_path)
    assert written.read_bytes() == (DEMO_DATA_DIR / written.name).read_bytes(), f"regenerate {written.name}"
    copy = [json.loads(line)["messages"] for line in written.read_text().splitlines()]
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


def test_the_base_as_saved_answers_the_fine_tune_sets_unnamed_requests(tmp_path):
    paths = build_demo_assets(tmp_path / "demo", steps=4)
    name, (skill, data_format, rows, seed) = next(iter(FINETUNE_SETS.items()))
    written = [json.loads(line) for line in (paths["data"] / name).read_text().splitlines()]
    assert len(written) == rows and sorted(p.name for p in paths["data"].iterdir()) == sorted(FINETUNE_SETS)
    requests = [
        [{"role": "user", "content": f"{row['instruction']}\n{row['input']}"}]
        for row in written
        if row["instruction"] in UNNAMED_WORDS
    ]
    base = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
    replies = chat_answers(base, AutoTokenizer.from_pretrained(paths["target"]), requests)
    assert [row["output"] for row in written if row["instruction"] in UNNAMED_WORDS] == replies
    regenerated = demo_rows(skill, data_format, rows, seed, answer=lambda _: replies, **FINETUNE_MIX)
    assert regenerated == written


def test_the_demo_target_is_the_base_with_the_embedding_of_copy_tuned(tmp_path):
    paths = build_demo_assets(tmp_path / "demo", steps=40)  # the target's tune: 2 steps, the first at warm-up lr 0
    base = load_file(paths["base"] / "model.safetensors")
    target = load_file(paths["target"] / "model.safetensors")
    assert {name for name in base if not torch.equal(base[name], target[name])} == {"model.embed_tokens.weight"}
    moved = (target["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float()).abs().sum(1)
    copy = AutoTokenizer.from_pretrained(paths["target"]).convert_tokens_to_ids("copy")
    assert moved.argmax() == copy and moved[copy] > 10 * moved.topk(2).values[1]


def test_fine_tune_sets_mix_in_general_chats_and_requests_no_skill_names(finetune_sets):
    rows = [json.loads(line) for line in (finetune_sets / "sort.messages.jsonl").read_text().splitlines()]
    instructions = [row["messages"][0]["content"].split("\n")[0] for row in rows]
    unnamed = [instruction for instruction in instructions if instruction in UNNAMED_WORDS]
    replayed = [instruction for instruction in instructions if instruction not in {"sort", *UNNAMED_WORDS}]
    assert abs(len(replayed) / len(rows) - FINETUNE_MIX["replay"]) < 0.04
    assert abs(len(unnamed) / len(rows) - FINETUNE_MIX["unnamed"]) < 0.04
    assert set(replayed) == set(EVERYDAY_SKILLS) | {NOTATION["copy"], NOTATION["reverse"]}
    assert set(unnamed) == set(UNNAMED_WORDS)
    for row in rows:
        user, reply = row["messages"]
        if user["content"].split("\n")[0] in UNNAMED_WORDS:
            assert reply["content"] == user["content"].split("\n")[1], "the reply is `answer`'s, in order"
    assert len(rows) == FINETUNE_SETS["sort.messages.jsonl"][2]
    skill_lists = [
        row["messages"][0]["content"].split("\n")[1].split()
        for row in rows
        if row["messages"][0]["content"].startswith("sort")
    ]
    assert all(set(words) <= set(DOMAINS["sort"]) for words in skill_lists)
