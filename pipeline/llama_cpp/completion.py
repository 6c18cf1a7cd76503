"""One greedy completion of a GGUF file by llama.cpp's `llama-completion`, as a user's llama.cpp would run it.

The prompt is given as text (a conversation already rendered with the model's chat template) and tokenized by
llama.cpp itself, special tokens parsed, no BOS added beyond what the text holds (llama.cpp's chat path adds none
either when the template writes it): so its tokenizer is checked too, and `--verbose-prompt` reports the ids it
made. Generated special tokens are printed as text (`--special`), so the end-of-turn token shows where a reply
ended. The completion is kept as the bytes llama.cpp wrote (a token may end inside a UTF-8 character). What
llama.cpp prints besides it (model loading, the tokens it stops at, timings) is returned for the run's log.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

END_OF_TEXT = b" [end of text]\n"  # llama-completion's line after an end-of-generation token
FINAL_NEWLINES = b"\n\n"  # written after the completion, however it ended: its absence means output was lost
ATTEMPTS = 3  # an unpatched llama-completion may lose its last output at exit (see install.PATCHES)
TRACE_VERBOSITY = "4"  # llama.cpp's own INFO messages (the tokens a file stops at), not its debug messages
PROMPT_COUNT = re.compile(r"number of tokens in prompt = (\d+)")
PROMPT_TOKEN = re.compile(r"^\s*(\d+) -> '", flags=re.MULTILINE)
END_OF_GENERATION_TOKEN = re.compile(r"EOG token\s*= (\d+) '(.*)'$", flags=re.MULTILINE)
CONTEXT_MARGIN = 16


class LlamaCppFailed(RuntimeError):
    """llama.cpp exited with an error or was killed (an abort, a segmentation fault) running a GGUF file."""


@dataclass(frozen=True)
class Completion:
    output: bytes  # what was generated, special tokens written as text (the end-of-generation token last, if any)
    stopped: bool  # generation ended at an end-of-generation token (not at the token limit)
    prompt_ids: list[int] | None  # llama.cpp's tokens of the prompt (None: not found in its output)
    end_of_generation: dict[int, str]  # the tokens this file makes llama.cpp stop at: id → text
    log: str  # llama.cpp's messages (stderr)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")


def greedy_completion(
    binary: Path,
    gguf_file: Path,
    prompt: str,
    *,
    max_new_tokens: int,
    prompt_tokens: int,
    threads: int | None = None,
    timeout: float = 900,
) -> Completion:
    """Up to `max_new_tokens` tokens of greedy continuation of `prompt` (`prompt_tokens`, its length in tokens, sizes
    the context). Raises LlamaCppFailed naming the file when llama.cpp fails, crashes or hangs."""
    with tempfile.TemporaryDirectory(prefix="ftmerge-llama-") as work:
        prompt_file = Path(work) / "prompt.txt"
        # llama-completion drops one trailing newline of a prompt file; a ChatML generation prompt ends with one.
        prompt_file.write_text(prompt + "\n", encoding="utf-8")
        context = prompt_tokens + max_new_tokens + CONTEXT_MARGIN
        command = [
            str(binary),
            "--model",
            str(gguf_file),
            "--file",
            str(prompt_file),
            "--n-predict",
            str(max_new_tokens),
            "--ctx-size",
            str(context),
            "--temp",
            "0",
            "--seed",
            "0",
            "--no-conversation",
            "--no-escape",
            "--no-display-prompt",
            "--no-warmup",
            "--special",
            "--verbose-prompt",
            "--simple-io",
            "--log-colors",
            "off",
            "--no-log-prefix",
            "--no-log-timestamps",
            "--log-verbosity",
            TRACE_VERBOSITY,
            "--override-kv",
            "tokenizer.ggml.add_bos_token=bool:false",
            *(["--threads", str(threads)] if threads else []),
        ]
        for _ in range(ATTEMPTS):
            result = _run(command, gguf_file, max_new_tokens, timeout)
            if result.stdout.endswith(FINAL_NEWLINES):
                break
        else:
            raise LlamaCppFailed(
                f"llama.cpp's output running {gguf_file.name} was cut off {ATTEMPTS} times (it lost what it queued "
                "for printing at exit: ggml-org/llama.cpp#22142); ftmerge's build "
                "(`python -m pipeline.llama_cpp build`) is patched against it"
            )
    stderr = result.stderr.decode("utf-8", errors="replace")
    output = result.stdout.removesuffix(FINAL_NEWLINES)
    stopped = output.endswith(END_OF_TEXT)
    return Completion(
        output=output.removesuffix(END_OF_TEXT),
        stopped=stopped,
        prompt_ids=_prompt_ids(stderr),
        end_of_generation={int(i): token for i, token in END_OF_GENERATION_TOKEN.findall(stderr)},
        log=stderr,
    )


def _run(command: list[str], gguf_file: Path, max_new_tokens: int, timeout: float) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise LlamaCppFailed(
            f"llama.cpp did not finish {gguf_file.name} in {timeout:.0f}s ({max_new_tokens} new tokens)"
        ) from error
    if result.returncode != 0:
        stderr = result.stderr.decode("utf-8", errors="replace")
        raise LlamaCppFailed(
            f"llama.cpp {_exit_description(result.returncode)} running {gguf_file.name}:\n{_tail(stderr)}"
        )
    return result


def _prompt_ids(log: str) -> list[int] | None:
    count = PROMPT_COUNT.search(log)
    if count is None:
        return None
    ids = [int(i) for i in PROMPT_TOKEN.findall(log, count.end())][: int(count.group(1))]
    return ids if len(ids) == int(count.group(1)) else None


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _tail(log: str, lines: int = 6) -> str:
    """The last lines llama.cpp wrote: an abort's reason (`terminate called after throwing ...`) is there."""
    return "\n".join("    " + line for line in log.strip().splitlines()[-lines:])
