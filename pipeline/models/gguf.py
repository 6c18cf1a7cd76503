"""A model directory written as GGUF for llama.cpp, Ollama and LM Studio, by llama.cpp's own converter.

The converter is llama.cpp's `convert_hf_to_gguf.py` as the `convert-hf-to-gguf` package ships it (its `conversion/`
modules and its own copy of `gguf`), called here as a library: the model class it registers for the architecture
writes the file, so tensor names, metadata, vocabulary, chat template and special tokens are exactly what
`convert_hf_to_gguf.py` writes. `bf16`, `f16` and `q8_0` come straight from it; the K-quants and the other llama.cpp
quantizations are made from a 16-bit GGUF by llama.cpp's `llama-quantize` binary.

llama.cpp picks its pre-tokenizer by a hash of the tokenizer's output on a fixed text; a tokenizer it has not
hashed (a tiny test tokenizer, a retrained vocabulary) is refused unless `tokenizer_pre` names the pre-tokenizer to
write, which replaces the converter's `get_vocab_base_pre` in a subclass of its model class.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

CONVERTER_PACKAGE = "convert-hf-to-gguf"
CONVERTER_OUTTYPES = ("bf16", "f16", "q8_0")
# llama-quantize's types that need no importance matrix.
QUANTIZE_OUTTYPES = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
)
CONVERTER_LOGGER = "hf-to-gguf"


class GgufExportError(RuntimeError):
    """The converter or llama-quantize could not write a file; the message says what to change."""


class UnrecognizedTokenizer(GgufExportError):
    """llama.cpp does not know the tokenizer's pre-tokenizer (its hash is not in the converter's table)."""


class TokenizerMismatch(GgufExportError):
    """The tokenizer's settings describe another kind of vocabulary than its tokens: the converter would write a file
    llama.cpp cannot run."""


def gguf_file_name(name: str, outtype: str) -> str:
    return f"{name}-{outtype}.gguf"


def converter_version() -> str | None:
    """The installed convert-hf-to-gguf version, None when it is not installed (found without importing it)."""
    try:
        return metadata.version(CONVERTER_PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _converter_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise GgufExportError(f"{module} not found: install {CONVERTER_PACKAGE} (it is a dependency of ftmerge)")
    return Path(spec.origin).read_text(encoding="utf-8")


def supported_architectures() -> set[str]:
    """The Hugging Face architectures the converter writes as text models, read from its source (importing it
    takes seconds: it imports torch and transformers)."""
    tree = ast.parse(_converter_source("conversion"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise GgufExportError("conversion/__init__.py has no TEXT_MODEL_MAP: an unexpected convert-hf-to-gguf version")


def known_pre_tokenizers() -> set[str]:
    """The pre-tokenizer names the converter writes for the tokenizers it recognizes (`res = "..."` in its
    `get_vocab_base_pre`), read from its source."""
    return set(re.findall(r'^\s+res = "([^"]+)"', _converter_source("conversion.base"), flags=re.MULTILINE))


def check_tokenizer(model_dir: Path) -> None:
    """Raise TokenizerMismatch when the tokenizer in `model_dir` would be written as a vocabulary of another kind
    than it is: a BPE with `byte_fallback: true` and a SentencePiece-style decoder (a `Sequence`), but no byte tokens
    `<0x00>`…`<0xFF>` (a byte-level BPE: its bytes are ordinary tokens). transformers rebuilds every Llama GGUF's
    tokenizer that way. llama.cpp's converter (gguf's LlamaHfVocab, on exactly these settings) writes it as a
    SentencePiece vocabulary (`tokenizer.ggml.model llama`, pre-tokenizer `default`), and llama.cpp aborts on the
    file (`std::out_of_range` in `llama_vocab::byte_to_token`, looking up the byte tokens it lacks)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = tokenizer.get("model") or {}, tokenizer.get("decoder") or {}
    byte_fallback = model.get("type") == "BPE" and model.get("byte_fallback")
    if not byte_fallback or decoder.get("type") != "Sequence" or "<0x0A>" in (model.get("vocab") or {}):
        return
    raise TokenizerMismatch(
        f"{path}: model.byte_fallback is true and the decoder is SentencePiece-style, but the vocabulary has no byte "
        "tokens (<0x00> to <0xFF>): it is a byte-level BPE. llama.cpp's converter would write it as a SentencePiece "
        "vocabulary (tokenizer.ggml.model llama, pre-tokenizer default), which llama.cpp cannot run (it aborts with "
        "std::out_of_range in byte_to_token). Restore the model's own tokenizer.json (for a byte-level BPE: "
        '"byte_fallback": false and a ByteLevel decoder): a tokenizer transformers rebuilt from a GGUF file has these '
        "settings wrong."
    )


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _model_class(architecture: str, tokenizer_pre: str | None, written: dict):
    """The converter's model class for `architecture`, subclassed so that its `get_vocab_base_pre` records the
    pre-tokenizer it writes; with `tokenizer_pre`, that name is written instead of the detected one (detection still
    runs, quietly, so a disagreement can be reported)."""
    from conversion import get_model_class

    try:
        model_class = get_model_class(architecture)
    except NotImplementedError:
        raise GgufExportError(
            f"llama.cpp's converter ({CONVERTER_PACKAGE} {converter_version()}) cannot convert {architecture}"
        ) from None

    def get_vocab_base_pre(self, tokenizer) -> str:
        if tokenizer_pre is None:
            written["tokenizer_pre"] = model_class.get_vocab_base_pre(self, tokenizer)
            return written["tokenizer_pre"]
        with _quiet(CONVERTER_LOGGER):
            try:
                written["detected_tokenizer_pre"] = model_class.get_vocab_base_pre(self, tokenizer)
            except NotImplementedError:
                written["detected_tokenizer_pre"] = None
        written["tokenizer_pre"] = tokenizer_pre
        return tokenizer_pre

    # The converter requires `model_arch` in each model class's own namespace.
    namespace = {"model_arch": model_class.model_arch, "get_vocab_base_pre": get_vocab_base_pre}
    return type(model_class.__name__, (model_class,), namespace)


def convert_to_gguf(
    model_dir: Path, out_file: Path, outtype: str, *, model_name: str, tokenizer_pre: str | None = None
) -> dict:
    """Write `model_dir` (a transformers model with its tokenizer) as one GGUF file of `outtype` (bf16, f16 or q8_0)
    with llama.cpp's converter. The file appears complete or not at all (written beside it, then renamed).

    Returns the architecture and the pre-tokenizer written (None for a vocabulary that has none, e.g.
    SentencePiece), and with `tokenizer_pre` the one the converter detected (None: not recognized).
    Raises UnrecognizedTokenizer naming the setting when the converter does not know the pre-tokenizer,
    TokenizerMismatch for a tokenizer it would write wrong.
    """
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture

    if outtype not in CONVERTER_OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: the converter writes {', '.join(CONVERTER_OUTTYPES)}")
    file_types = {
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    model_dir, out_file = Path(model_dir), Path(out_file)
    check_tokenizer(model_dir)
    architecture = get_model_architecture(ModelBase.load_hparams(model_dir, False), ModelType.TEXT)
    written: dict = {"tokenizer_pre": None}
    model_class = _model_class(architecture, tokenizer_pre, written)
    temporary = out_file.with_name(f".{out_file.name}.tmp")
    try:
        with torch.inference_mode():
            model_class(model_dir, file_types[outtype], temporary, model_name=model_name).write()
        os.replace(temporary, out_file)
    except NotImplementedError as error:
        if "pre-tokenizer was not recognized" not in str(error):
            raise
        raise UnrecognizedTokenizer(
            f"llama.cpp's converter does not recognize the pre-tokenizer of the tokenizer in {model_dir} (it knows "
            "released models' tokenizers by a hash of their output). If this tokenizer splits text like a known "
            "one, set export.gguf.tokenizer_pre to that one's name, e.g. qwen2 for a Qwen2/Qwen2.5 tokenizer or "
            "llama-bpe for Llama 3's; the hash is in the run's log under <output_dir>/logs/."
        ) from None
    finally:
        temporary.unlink(missing_ok=True)
    return {"architecture": architecture, **written}


def quantize_gguf(llama_quantize: Path, source: Path, out_file: Path, outtype: str) -> None:
    """`llama-quantize source out_file OUTTYPE`: a llama.cpp quantization (q4_k_m, ...) of a 16-bit GGUF, written
    beside `out_file` and renamed into place. Its output goes to the run's log; a failure raises with its last
    lines."""
    if outtype not in QUANTIZE_OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: llama-quantize is used for {', '.join(QUANTIZE_OUTTYPES)}")
    out_file = Path(out_file)
    temporary = out_file.with_name(f".{out_file.name}.tmp")
    command = [str(llama_quantize), str(source), str(temporary), outtype.upper()]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        print(result.stdout + result.stderr)
        if result.returncode != 0 or not temporary.is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise GgufExportError(f"{' '.join(command)} failed (exit {result.returncode}):\n{tail}")
        os.replace(temporary, out_file)
    finally:
        temporary.unlink(missing_ok=True)
