"""The offline demo: its tiny lineage (lineage.py) and `python -m pipeline.demo` (__main__.py)."""

from pathlib import Path

DEMO_RECIPE = Path("recipes/tiny_cpu.yaml")
DEMO_MODELS = Path(".cache/demo-models")
