"""`python -m pipeline.llama_cpp build|where`: llama.cpp's programs for the export stage.

build   build llama-completion and llama-quantize from the pinned source into ftmerge's cache (nothing to do when
        they are there); `--skip-without-compiler` makes a machine without a compiler or cmake a message, not an
        error (`make setup` uses it: ftmerge runs without llama.cpp, its GGUF files are then not verified)
where   which llama-completion and llama-quantize the export stage would use
"""

from __future__ import annotations

import argparse
import sys

from pipeline.llama_cpp.install import (
    SOURCE,
    TOOLS,
    BuildToolsMissing,
    LlamaCppBuildError,
    build,
    find_tool,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.llama_cpp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_command = commands.add_parser("build", help="build llama.cpp's programs into ftmerge's cache")
    build_command.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    build_command.add_argument("--skip-without-compiler", action="store_true")
    commands.add_parser("where", help="the llama.cpp programs the export stage would use")
    arguments = parser.parse_args(argv)
    if arguments.command == "where":
        for tool in TOOLS:
            print(f"{tool}: {find_tool(tool) or 'not found'}")
        return 0
    try:
        directory = build(jobs=arguments.jobs)
    except BuildToolsMissing as error:
        print(
            f"llama.cpp: {error}. Install them (Debian/Ubuntu: apt install build-essential cmake) and run "
            "`python -m pipeline.llama_cpp build`, or put your own llama.cpp's llama-completion and llama-quantize "
            "on PATH. Until then the export stage writes GGUF files it cannot verify, and makes no K-quants.",
            file=sys.stderr,
        )
        return 0 if arguments.skip_without_compiler else 1
    except LlamaCppBuildError as error:
        print(f"llama.cpp: {error}", file=sys.stderr)
        return 1
    print(f"llama.cpp ({SOURCE.label}): {directory / 'bin'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
