"""`ftmerge run|search-worker|dashboard|archive|inspect|demo ...`: one command for the project's entry points.

Each subcommand hands the rest of the line to the module it names, so `ftmerge run RECIPE` takes exactly the flags of
`python -m pipeline.run RECIPE` (and both keep working). Modules are imported when chosen: `ftmerge run --status`
does not pay for `inspect`'s datasets import.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "run": "run a recipe's stages (python -m pipeline.run)",
    "search-worker": "work trials of a recipe's search study in a shared database (python -m pipeline.search_worker)",
    "dashboard": "optuna-dashboard on a recipe's search study (python -m pipeline.dashboard)",
    "archive": "list, verify, add, extract or combine archived adapters (python -m pipeline.archive)",
    "inspect": "show prepared examples as the trainer sees them (python -m pipeline.inspect)",
    "demo": "build the tiny offline models and run recipes/tiny_cpu.yaml (python -m pipeline.demo)",
}


def usage() -> str:
    return (
        "usage: ftmerge {"
        + ",".join(COMMANDS)
        + "} ...\n       ftmerge --version\n\n"
        + "\n".join(f"  {name:<14} {help_text}" for name, help_text in COMMANDS.items())
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from pipeline import __version__

        print(f"ftmerge {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        from pipeline.run import main as run_main

        return run_main(rest, prog="ftmerge run")
    if command == "search-worker":
        from pipeline.search_worker import main as worker_main

        return worker_main(rest)
    if command == "dashboard":
        from pipeline.dashboard import main as dashboard_main

        return dashboard_main(rest)
    if command == "archive":
        from pipeline.archive.__main__ import main as archive_main

        return archive_main(rest)
    if command == "inspect":
        from pipeline.inspect import main as inspect_main

        return inspect_main(rest)
    if command == "demo":
        from pipeline.demo.__main__ import main as demo_main

        return demo_main(rest)
    print(f"ftmerge: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
