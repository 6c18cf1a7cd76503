"""`make demo`: build the tiny demo models once (cached in .cache/demo-models), then run recipes/tiny_cpu.yaml.

Extra arguments go to `python -m pipeline.run`, e.g. `python -m pipeline.demo --status`.
"""

from __future__ import annotations

import sys
import time

from pipeline import run
from pipeline.demo import DEMO_MODELS, DEMO_RECIPE
from pipeline.demo.lineage import build_demo_assets


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    build_demo_assets(DEMO_MODELS)
    print(f"demo models ready in {DEMO_MODELS} ({time.time() - started:.1f}s)")
    return run.main([str(DEMO_RECIPE), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
