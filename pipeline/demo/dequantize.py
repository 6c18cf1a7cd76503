"""Child process of pipeline/demo/smollm2.py: SmolLM2-135M-Instruct's Q4_1 GGUF → a bf16 safetensors model directory
with the tokenizer settings of the model's Hub repository (HuggingFaceTB/SmolLM2-135M-Instruct).

Runs with a `gguf` distribution first on PYTHONPATH (transformers' GGUF loader checks the installed metadata), so it
must not import llama.cpp's converter, whose own `gguf` that path hides.

    python -m pipeline.demo.dequantize GGUF_FILE OUT_DIR

Why the tokenizer is rebuilt: the GGUF records the Hub's tokenizer correctly (`tokenizer.ggml.model = gpt2`,
`pre = smollm`, bos 1 `<|im_start|>`, eos and pad 2 `<|im_end|>`), but transformers 5.17's loader
(integrations/ggml.py, GGUFLlamaConverter, chosen by the *architecture*, llama) rebuilds every Llama GGUF's
vocabulary as a SentencePiece-style BPE: `byte_fallback: true`, an unknown token, ByteFallback/Metaspace decoders, no
digit splitting, and bos and eos swapped (its `eos_token` is `<|im_start|>`). Saved as it is, llama.cpp's converter
takes that for a SentencePiece vocabulary (`tokenizer.ggml.model = llama`, eos 1) and llama.cpp aborts on the first
prompt (`std::out_of_range` in `llama_vocab::byte_to_token`); generation would not stop at `<|im_end|>` either. So
the vocabulary and merges are kept and the Hub's pipeline is restored around them (HUB_TOKENIZER_PIPELINE), with the
special tokens the GGUF names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# SmolLM2's tokenizer.json on the Hub (the StarCoder layout): no normalizer, each digit split off, then GPT-2's
# byte-level regex; a plain byte-level BPE without byte fallback or unknown token.
HUB_TOKENIZER_PIPELINE = {
    "normalizer": None,
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
    "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
}
HUB_BPE_MODEL = {"unk_token": None, "fuse_unk": False, "byte_fallback": False}
# The Hub's tokenizer_config.json: ChatML's markers are its special tokens beyond the GGUF's bos/eos/pad/unk.
CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
MODEL_MAX_LENGTH = 8192


def gguf_special_tokens(gguf_file: Path) -> dict[str, str]:
    """bos, eos, pad and unk as the GGUF's tokenizer metadata names them (the Hub's: <|im_start|>, <|im_end|>,
    <|im_end|>, <|endoftext|>), and its tokenizer model and pre-tokenizer, checked to be the ones restored here."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields
    model, pre = fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.pre"].contents()
    if (model, pre) != ("gpt2", "smollm"):
        raise ValueError(f"{gguf_file}: tokenizer {model}/{pre}, expected SmolLM2's gpt2/smollm")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    return {name: tokens[fields[f"tokenizer.ggml.{key}"].contents()] for name, key in keys.items()}


def restored_tokenizer(loaded, special: dict[str, str], chat_template: str):
    """The GGUF-loaded tokenizer's vocabulary and merges in the Hub's pipeline, as a fast tokenizer with the GGUF's
    special tokens. Saved with the generic TokenizersBackend class, which loads tokenizer.json as written (a
    model-specific class may rebuild the pipeline from the vocabulary)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(loaded.backend_tokenizer.to_str())
    state.update(HUB_TOKENIZER_PIPELINE)
    state["model"].update(HUB_BPE_MODEL)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=special["pad"],
        unk_token=special["unk"],
        additional_special_tokens=CHATML_SPECIAL_TOKENS,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        chat_template=chat_template,
    )


def hub_config(config, tokenizer) -> dict:
    """config.json with the Hub's keys in its (transformers 4) layout: top-level `rope_theta`, which llama.cpp's
    converter and older loaders read, and `torch_dtype`; no GGUF quantization entry. rms_norm_eps is the Hub's 1e-05,
    which the GGUF stores as a float32."""
    kept = [
        "attention_bias", "attention_dropout", "head_dim", "hidden_act", "hidden_size", "intermediate_size",
        "max_position_embeddings", "mlp_bias", "model_type", "num_attention_heads", "num_hidden_layers",
        "num_key_value_heads", "pretraining_tp", "tie_word_embeddings", "use_cache", "vocab_size",
    ]  # fmt: skip
    return {
        "architectures": ["LlamaForCausalLM"],
        **{key: getattr(config, key) for key in kept},
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "rms_norm_eps": float(f"{config.rms_norm_eps:.7g}"),
        "rope_scaling": None,
        "rope_theta": config.rope_parameters["rope_theta"],
        "torch_dtype": "bfloat16",
    }


def dequantize(gguf_file: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise SystemExit("no gguf>=0.10 distribution on this process's path: see pipeline/demo/smollm2.py")
    directory, name = gguf_file.parent, gguf_file.name
    special = gguf_special_tokens(gguf_file)
    loaded_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer = restored_tokenizer(loaded_tokenizer, special, loaded_tokenizer.chat_template)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = hub_config(loaded.config, tokenizer)
    # The GGUF-loaded model refuses save_pretrained (it counts as quantized): its weights go into a plain model.
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    dequantize(Path(sys.argv[1]), Path(sys.argv[2]))
