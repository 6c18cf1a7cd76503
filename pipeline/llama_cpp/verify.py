"""Does llama.cpp run a GGUF file as transformers runs the model it was converted from?

Both continue the same chat prompts greedily. transformers computes in float32 on the merged model's weights (a
bf16 weight is exact in float32), and keeps the top logits of each step it takes. llama.cpp tokenizes the prompt
text itself and generates from the GGUF. Per prompt the outcome is:

- `identical`: the same text, up to the same end-of-generation token or the same token limit;
- `near-tie`: the same text up to a step where llama.cpp continued with a token transformers scored within
  TIE_RELATIVE of its best logit (1%: 0.2 logits of a real model's 20 or so). llama.cpp multiplies a 16-bit file's
  weights with activations rounded to 16 bits where transformers keeps float32; at a near-tie that rounding may pick
  either token, after which the texts cannot be compared;
- `differs`: llama.cpp continued with a token transformers scored well below its choice (or not in its top
  candidates): the file does not compute what the model computes;
- `prompt-differs`: llama.cpp tokenized the prompt into other ids than transformers: a tokenizer written wrong.

A 16-bit file (bf16, f16) must give no `differs` and no `prompt-differs`; a quantized one reports its agreement. Any
file must stop at the chat template's end-of-turn token: llama.cpp lists the tokens it stops at when it loads a
file, and the end-of-turn token must be one of them.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.llama_cpp.completion import Completion, greedy_completion

EXACT_OUTTYPES = ("bf16", "f16")
TOP_CANDIDATES = 10
# Candidates closer than this fraction of the best logit are a tie that 16-bit activations may break either way. The
# differences measured at such steps: 0.000 and 0.003 logits of 0.5 on a random tiny model (bf16); SmolLM2-135M's
# bf16 file never reached one (6 of 6 prompts identical, 32 tokens), its q8_0 file did at 0.04 to 0.19 of about 24.
TIE_RELATIVE = 0.01


class GgufVerificationFailed(RuntimeError):
    """llama.cpp ran a GGUF file differently from transformers on the model it came from."""


@dataclass(frozen=True)
class Reference:
    """transformers' greedy continuation of one prompt."""

    prompt: str
    prompt_ids: list[int]
    new_ids: list[int]
    top: list[list[tuple[int, float]]]  # per generated step: the TOP_CANDIDATES best (id, logit), best first


@dataclass(frozen=True)
class PromptOutcome:
    verdict: str  # identical | near-tie | differs | prompt-differs
    agreeing_tokens: int  # new tokens that agree before the first difference (all of them when identical)
    tokens: int  # transformers' new tokens
    stopped: bool  # llama.cpp ended the reply at an end-of-generation token
    detail: str | None = None  # where and how it differs

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class FileVerification:
    file: str
    outtype: str
    outcomes: list[PromptOutcome] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    end_of_turn: str | None = None
    stops_at_end_of_turn: bool | None = None  # None: no end-of-turn token to check
    end_of_generation: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def must_agree(self) -> bool:
        return self.outtype in EXACT_OUTTYPES

    def count(self, verdict: str) -> int:
        return sum(outcome.verdict == verdict for outcome in self.outcomes)

    def problems(self) -> list[str]:
        """Why this file fails the check (empty when it passes)."""
        problems = []
        for index, outcome in enumerate(self.outcomes):
            wrong = outcome.verdict == "prompt-differs" or (self.must_agree and outcome.verdict == "differs")
            if wrong:
                problems.append(f"prompt {index + 1} ({_shorten(self.prompts[index])}): {outcome.detail}")
                break  # the first prompt that differs
        if self.stops_at_end_of_turn is False:
            problems.append(
                f"llama.cpp does not stop at the chat template's end-of-turn token {self.end_of_turn!r} (it stops at "
                f"{', '.join(self.end_of_generation) or 'no token'}): replies would run on to the token limit. The "
                "GGUF's eos_token_id comes from the merged model's tokenizer_config.json / generation_config.json"
            )
        return problems

    def summary_line(self) -> str:
        total = len(self.outcomes)
        parts = [f"{self.count('identical')}/{total} prompts identical to transformers"]
        if self.count("near-tie"):
            parts.append(f"{self.count('near-tie')} up to a near-tie")
        differing = [o for o in self.outcomes if o.verdict in ("differs", "prompt-differs")]
        if differing:
            agreeing = sum(o.agreeing_tokens for o in differing) / len(differing)
            parts.append(f"{len(differing)} differ (after {agreeing:.1f} tokens on average)")
        if self.count("identical") < total:
            parts.append(f"{self.token_agreement():.0%} of tokens agree before a first difference")
        stops = sum(outcome.stopped for outcome in self.outcomes)
        if self.stops_at_end_of_turn is not None:
            where = (
                f"stops at {self.end_of_turn}"
                if self.stops_at_end_of_turn
                else "does NOT stop at " + str(self.end_of_turn)
            )
            parts.append(f"{where} ({stops}/{total} replies ended there)")
        return ", ".join(parts)

    def token_agreement(self) -> float | None:
        """The share of transformers' tokens llama.cpp gave before its first difference, over all prompts."""
        tokens = sum(o.tokens for o in self.outcomes)
        return sum(o.agreeing_tokens for o in self.outcomes) / tokens if tokens else None

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "outtype": self.outtype,
            "must_agree": self.must_agree,
            "prompts": len(self.outcomes),
            "identical": self.count("identical"),
            "near_tie": self.count("near-tie"),
            "differs": self.count("differs") + self.count("prompt-differs"),
            "agreement": round(self.count("identical") / len(self.outcomes), 4) if self.outcomes else None,
            "token_agreement": None if self.token_agreement() is None else round(self.token_agreement(), 4),
            "end_of_turn": self.end_of_turn,
            "stops_at_end_of_turn": self.stops_at_end_of_turn,
            "end_of_generation_tokens": self.end_of_generation,
            "outcomes": [outcome.as_dict() for outcome in self.outcomes],
            "seconds": round(self.seconds, 1),
            "summary": self.summary_line(),
        }


def transformers_references(
    model_dir: Path,
    tokenizer,
    prompts: list[str],
    *,
    stop_ids: list[int],
    max_new_tokens: int,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> list[Reference]:
    """transformers' greedy continuation of each prompt (one at a time: no padding), in float32, on the idle cores."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.evaluation.generate import greedy_settings

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    settings = greedy_settings(stop_ids, pad_id, max_new_tokens, output_logits=True, return_dict_in_generate=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, idle_cores()))
    try:
        references = [_greedy(model, tokenizer, prompt, settings, device) for prompt in prompts]
    finally:
        torch.set_num_threads(threads)
    del model
    return references


def _greedy(model, tokenizer, prompt: str, settings, device: str) -> Reference:
    import torch

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings)
    new_ids = output.sequences[0, len(prompt_ids) :].tolist()
    top = []
    for logits in output.logits[: len(new_ids)]:
        values, indices = logits[0].float().topk(TOP_CANDIDATES)
        top.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
    return Reference(prompt, prompt_ids, new_ids, top)


def idle_cores() -> int:
    """The cores not busy now (by the 1-minute load average), at least one. Threads beyond them wait on each other:
    24 tokens of SmolLM2-135M took llama.cpp 3.0 s on one thread and 65 s on two, torch 5 s and 55 s, on two cores
    with a load of 10."""
    count = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return count
    return max(1, min(count, round(count - load)))


class TokenBytes:
    """The bytes a token id stands for, as llama.cpp prints it: a byte-level BPE's token mapped back through GPT-2's
    byte alphabet, a SentencePiece token with its `▁` as a space and `<0xNN>` as that byte, an added token as its
    text. (transformers decodes to text only, which loses a token that ends inside a UTF-8 character.)"""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        decoders = _decoder_types(backend.get("decoder"))
        self.tokenizer = tokenizer
        self.added = {token.content: token.content.encode() for token in tokenizer.added_tokens_decoder.values()}
        self.byte_level = "ByteLevel" in decoders
        self.byte_fallback = "ByteFallback" in decoders
        self.metaspace = "Metaspace" in decoders or "Replace" in decoders
        self.alphabet = {character: byte for byte, character in bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> bytes:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token is None:  # a padding row of the embedding, beyond the tokenizer: llama.cpp prints nothing for it
            return b""
        if token in self.added:
            return self.added[token]
        if self.byte_level and all(character in self.alphabet for character in token):
            return bytes(self.alphabet[character] for character in token)
        if self.byte_fallback and (byte := BYTE_TOKEN.fullmatch(token)):
            return bytes([int(byte.group(1), 16)])
        if self.metaspace:
            return token.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()

    def join(self, token_ids: list[int]) -> bytes:
        return b"".join(self(token_id) for token_id in token_ids)


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    return {decoder["type"]}.union(*(_decoder_types(d) for d in decoder.get("decoders") or []))


def compare(
    token_bytes: TokenBytes, reference: Reference, completion: Completion, tie_relative: float = TIE_RELATIVE
) -> PromptOutcome:
    """One prompt's outcome (see the module's docstring), compared byte for byte."""
    new_ids = list(reference.new_ids)
    end = next((i for i, token in enumerate(new_ids) if token in completion.end_of_generation), None)
    if end is not None:  # llama.cpp stops at every token it counts as end of generation: so does the comparison
        new_ids = new_ids[: end + 1]
    tokens, stopped = len(new_ids), completion.stopped
    if completion.prompt_ids is not None and completion.prompt_ids != reference.prompt_ids:
        detail = _prompt_difference(token_bytes.tokenizer, reference, completion)
        return PromptOutcome("prompt-differs", 0, tokens, stopped, detail)
    produced = completion.output
    if token_bytes.join(new_ids) == produced:
        return PromptOutcome("identical", tokens, tokens, stopped)
    step = position = 0
    while step < tokens and produced.startswith(token_bytes(new_ids[step]), position):
        position += len(token_bytes(new_ids[step]))
        step += 1
    rest = produced[position:]
    if step == tokens:
        detail = f"transformers ended after {tokens} tokens, llama.cpp went on: {_show(rest)}"
        return PromptOutcome("differs", step, tokens, stopped, detail)
    expected = _show(token_bytes(new_ids[step]))
    matches = [
        (logit, token)
        for token, logit in reference.top[step]
        if token != new_ids[step] and token_bytes(token) and rest.startswith(token_bytes(token))
    ]
    if matches:
        logit, token = max(matches)
        best = reference.top[step][0][1]
        margin = best - logit
        detail = (
            f"token {step + 1}: transformers {expected}, llama.cpp {_show(token_bytes(token))}, "
            f"{margin:.3f} logits behind"
        )
        verdict = "near-tie" if margin <= tie_relative * abs(best) else "differs"
        return PromptOutcome(verdict, step, tokens, stopped, detail)
    detail = (
        f"token {step + 1}: transformers {expected}, llama.cpp continues {_show(rest[:24])} (not among transformers' "
        f"{TOP_CANDIDATES} best)"
    )
    return PromptOutcome("differs", step, tokens, stopped, detail)


def _show(data: bytes) -> str:
    return repr(data.decode("utf-8", errors="replace"))


def _prompt_difference(tokenizer, reference: Reference, completion: Completion) -> str:
    ours, theirs = reference.prompt_ids, completion.prompt_ids
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))

    def token(ids: list[int]) -> str:
        return f"{ids[index]} {tokenizer.convert_ids_to_tokens(ids[index])!r}" if index < len(ids) else "(end)"

    return (
        f"llama.cpp tokenizes the prompt differently: {len(theirs)} tokens, transformers {len(ours)}; first "
        f"difference at token {index + 1}: transformers {token(ours)}, llama.cpp {token(theirs)}"
    )


def verify_file(
    llama_completion: Path,
    gguf_file: Path,
    outtype: str,
    tokenizer,
    references: list[Reference],
    *,
    max_new_tokens: int,
    end_of_turn: tuple[int, str] | None,
    labels: list[str] | None = None,
    log=print,
) -> FileVerification:
    """Run every reference prompt through llama.cpp on `gguf_file` and compare; `end_of_turn` is the chat template's
    (id, text), `labels` name the prompts in messages. llama.cpp's own messages go to `log`. Raises LlamaCppFailed
    when llama.cpp fails or crashes."""
    started = time.time()
    token_bytes = TokenBytes(tokenizer)
    result = FileVerification(
        gguf_file.name,
        outtype,
        prompts=labels or [r.prompt for r in references],
        end_of_turn=end_of_turn[1] if end_of_turn else None,
    )
    for reference in references:
        completion = greedy_completion(
            llama_completion,
            gguf_file,
            reference.prompt,
            max_new_tokens=max_new_tokens,
            prompt_tokens=len(reference.prompt_ids),
            threads=idle_cores(),
        )
        log(f"llama.cpp on {gguf_file.name}:\n{completion.log}\ncompletion: {completion.text!r}")
        result.outcomes.append(compare(token_bytes, reference, completion))
        result.end_of_generation = list(completion.end_of_generation.values())
        if end_of_turn is not None:
            result.stops_at_end_of_turn = end_of_turn[0] in completion.end_of_generation
    result.seconds = time.time() - started
    return result


def _shorten(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else "…" + flat[-width:])


VERIFICATION_FILE = "verification.json"


def write_verification(export_dir: Path, outcome: dict) -> None:
    """The check's outcome beside the GGUF files, for the model card (`read_verification`)."""
    (Path(export_dir) / VERIFICATION_FILE).write_text(json.dumps(outcome, indent=2, ensure_ascii=False) + "\n")


def read_verification(export_dir: Path) -> dict | None:
    """What `write_verification` wrote in an export directory; None when there is nothing (an older export)."""
    path = Path(export_dir) / VERIFICATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def template_end_of_turn(tokenizer) -> tuple[int, str] | None:
    """The chat template's end-of-turn token (id, text); None without a template or when a reply does not end with
    one special token."""
    from pipeline.data.templates import ChatTemplateError, end_of_turn_token, load_template

    try:
        template = load_template("target", tokenizer)
        token = end_of_turn_token(template, tokenizer, dict(tokenizer.special_tokens_map))
    except ChatTemplateError:
        return None
    return tokenizer.convert_tokens_to_ids(token), token


def check_files(
    model_dir: Path,
    tokenizer,
    files: dict[str, tuple[Path, bool]],
    requests: list[tuple[str, list[dict]]],
    *,
    llama_completion: Path,
    max_new_tokens: int,
    trust_remote_code: bool = False,
    say=print,
) -> tuple[dict, list[str]]:
    """Every GGUF file (outtype → (path, kept: False for a temporary one)) against transformers on `model_dir`, on
    the (source, conversation) requests; `say` gets one line per file. Returns the outcome (what verification.json
    holds) and the problems of the files that fail. Raises LlamaCppFailed when llama.cpp fails or crashes."""
    import torch

    from pipeline.llama_cpp.prompts import last_request, render_prompts

    prompts = render_prompts(tokenizer, [conversation for _, conversation in requests])
    turn_end = template_end_of_turn(tokenizer)
    stop_ids = sorted({tokenizer.eos_token_id, *([turn_end[0]] if turn_end else [])} - {None})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    say(
        f"export: checking {len(files)} GGUF file(s) with llama.cpp against transformers ({device}, float32) on "
        f"{len(prompts)} prompts, {max_new_tokens} new tokens each"
    )
    references = transformers_references(
        model_dir,
        tokenizer,
        prompts,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    labels = [last_request(conversation) for _, conversation in requests]
    results, failures = {}, []
    for outtype, (file, kept) in files.items():
        result = verify_file(
            llama_completion,
            file,
            outtype,
            tokenizer,
            references,
            max_new_tokens=max_new_tokens,
            end_of_turn=turn_end,
            labels=labels,
        )
        name = file.name if kept else f"{file.name} (llama-quantize's input, not kept)"
        say(f"export: {name}: {result.summary_line()}")
        results[outtype] = {**result.as_dict(), "kept": kept}
        failures += [f"{file.name}: {problem}" for problem in result.problems()]
    outcome = {
        "verified": True,
        "llama_completion": str(llama_completion),
        "reference": f"transformers, float32, {device}",
        "max_new_tokens": max_new_tokens,
        "tie_relative": TIE_RELATIVE,
        "prompts": [{"source": source, "request": label} for (source, _), label in zip(requests, labels, strict=True)],
        "files": results,
    }
    return outcome, failures
