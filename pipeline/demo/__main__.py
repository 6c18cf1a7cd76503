"""`make demo`: build the tiny demo models once (cached in .cache/demo-models), then run recipes/tiny_cpu.yaml.

Extra arguments go to `python -m pipeline.run`, e.g. `python -m pipeline.demo --status`.
"""

from __future__ import annotations

import json
import sys
import time

from pipeline import console, run
from pipeline.demo import DEMO_MODELS, DEMO_RECIPE
from pipeline.demo.lineage import DISTANCE_FILE, build_demo_assets, describe_distance


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    # Building is not a run of the recipe: its library output goes to a log of its own, beside the models.
    with (
        console.run_console(DEMO_MODELS.parent, verbose="--verbose" in argv, command="demo models"),
        console.progress("demo models (built once)"),
    ):
        build_demo_assets(DEMO_MODELS)
    distance = json.loads((DEMO_MODELS / DISTANCE_FILE).read_text())
    console.say(f"demo models ready in {DEMO_MODELS} ({time.time() - started:.1f}s); {describe_distance(distance)}")
    return run.main([str(DEMO_RECIPE), *argv])


if __name__ == "__main__":
    sys.exit(main())
