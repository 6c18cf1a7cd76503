"""Benchmark the merge: apply + the mergekit engine vs the fused engine, with 2 and 4 adapters, TIES.

    .venv/bin/python bench/merge.py                 # models cached under $TMPDIR/ftmerge-bench (see bench/apply.py)

Each path runs the real stages (apply.run, merge.run) in its own process. Prints wall time, peak RSS and bytes
written of both, their ratios, and whether the merged tensors are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from apply import CACHE, identical, peak_rss, qwen2_05b_config, random_adapter, random_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAYERS = 24


def archive(count: int) -> tuple[Path, Path, Path]:
    """Base, target, and an archive of `count` adapters trained on that base (manifests as the archive writes)."""
    from pipeline.archive.store import file_hashes

    config = qwen2_05b_config(LAYERS)
    base = random_model(CACHE / f"base-{LAYERS}", config, seed=0)
    target = random_model(CACHE / f"target-{LAYERS}", config, seed=1, like=base)
    archive_dir = CACHE / f"archive-{count}"
    for index in range(count):
        entry = archive_dir / f"adapter-{index}"
        if (entry / "manifest.json").is_file():
            continue
        adapter = random_adapter(CACHE / f"adapter-{LAYERS}-{index}", config, seed=10 + index)
        entry.mkdir(parents=True, exist_ok=True)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(adapter / file, entry / file)
        manifest = {"name": entry.name, "base_model": str(base), "files": file_hashes(entry)}
        (entry / "manifest.json").write_text(json.dumps(manifest))
    return base, target, archive_dir


def recipe_for(engine: str, count: int, output_dir: Path):
    from pipeline.recipe import Recipe

    base, target, archive_dir = archive(count)
    return Recipe.model_validate({
        "name": "bench", "base_model": str(base), "target_model": str(target), "output_dir": str(output_dir),
        "archive_dir": str(archive_dir), "apply": {"device": "cpu"},
        "merge": {"engine": engine, "device": "cpu", "parameters": {"normalize": True, "int8_mask": True}}})


def worker(engine: str, count: int, output_dir: Path) -> None:
    """Runs in a child process: the stages one engine needs, then one JSON line of measurements."""
    from pipeline.stages import Inputs, StageRef, apply, merge

    recipe = recipe_for(engine, count, output_dir)
    started = time.perf_counter()
    inputs = {}
    if engine == "mergekit":
        for name in apply.items(recipe):
            out = apply.STAGE.output_path(recipe, name)
            out.mkdir(parents=True)
            apply.run(recipe, name, out, Inputs())
            inputs[StageRef("apply", name)] = out
    out = merge.STAGE.output_path(recipe, "")
    out.mkdir(parents=True)
    merge.run(recipe, "", out, Inputs(inputs))
    seconds = time.perf_counter() - started
    files = [f for f in output_dir.rglob("*") if f.is_file()]
    written = sum(f.stat().st_size for f in files)
    intermediate = sum(f.stat().st_size for f in files if out not in f.parents)
    print(json.dumps({"seconds": seconds, "written": written, "intermediate": intermediate,
                      "peak_rss": peak_rss()}))


def measure(engine: str, count: int) -> dict:
    output_dir = CACHE / f"merge-{engine}-{count}"
    shutil.rmtree(output_dir, ignore_errors=True)
    result = subprocess.run([sys.executable, __file__, "--worker", engine, str(count), str(output_dir)], check=True,
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "output": output_dir / "merge"}


def bench(count: int) -> None:
    base, target, _ = archive(count)
    subprocess.run(f"cat {base}/*.safetensors {target}/*.safetensors > /dev/null", shell=True, check=True)
    reference = measure("mergekit", count)
    fused = measure("fused", count)
    same = identical(fused["output"], reference["output"])
    print(f"{count} adapters: apply+mergekit {reference['seconds']:.1f}s {reference['peak_rss'] / 1e9:.2f} GB "
          f"{reference['written'] / 1e9:.2f} GB written | fused {fused['seconds']:.1f}s "
          f"{fused['peak_rss'] / 1e9:.2f} GB {fused['written'] / 1e9:.2f} GB written | "
          f"time {fused['seconds'] / reference['seconds']:.2f}x RSS {fused['peak_rss'] / reference['peak_rss']:.2f}x "
          f"intermediate bytes {fused['intermediate']} vs {reference['intermediate']} | identical: {same}",
          flush=True)
    for result in (reference, fused):
        shutil.rmtree(result["output"].parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "COUNT", "OUTPUT_DIR"))
    parser.add_argument("--adapters", type=int, nargs="*", default=[2, 4])
    args = parser.parse_args()
    if args.worker:
        engine, count, output_dir = args.worker
        worker(engine, int(count), Path(output_dir))
        return
    for count in args.adapters:
        bench(count)


if __name__ == "__main__":
    main()
