"""Benchmark the merge as the archive grows: apply + the mergekit engine vs the fused engine, TIES (seed parameters).

    .venv/bin/python bench/merge.py --adapters 1 4 8 16   # models cached under $TMPDIR/ftmerge-bench (bench/apply.py)
    .venv/bin/python bench/merge.py --reference-up-to 8    # mergekit path above 8 adapters: reuse the 8 measurement
    .venv/bin/python bench/merge.py --adapters 8 --device cuda --fused-only   # the fused merge's time on a GPU

Each path runs the real stages (apply.run, merge.run) in its own process. Prints wall time, CPU time, peak RSS and
bytes written of both, their ratios, whether the merged tensors are identical, the load average, the I/O floor
(reading base and target once, writing the output once) and the goals of issue #32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def recipe_for(engine: str, count: int, output_dir: Path, device: str = "cpu"):
    from pipeline.recipe import Recipe

    base, target, archive_dir = archive(count)
    return Recipe.model_validate(
        {
            "name": "bench",
            "base_model": str(base),
            "target_model": str(target),
            "output_dir": str(output_dir),
            "archive_dir": str(archive_dir),
            "apply": {"device": device},
            "merge": {"engine": engine, "device": device, "parameters": {"normalize": True, "int8_mask": True}},
        }
    )


def worker(engine: str, count: int, output_dir: Path, device: str) -> None:
    """Runs in a child process: the stages one engine needs, then one JSON line of measurements."""
    from pipeline.runner import inputs_of
    from pipeline.stages import apply, merge

    recipe = recipe_for(engine, count, output_dir, device)
    started = time.perf_counter()
    if engine == "mergekit":
        for name in apply.items(recipe):
            out = apply.STAGE.output_path(recipe, name)
            out.mkdir(parents=True)
            apply.run(recipe, name, out, inputs_of(recipe, "apply", name))
    out = merge.STAGE.output_path(recipe, "")
    out.mkdir(parents=True)
    summary = merge.run(recipe, "", out, inputs_of(recipe, "merge"))
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    files = [f for f in output_dir.rglob("*") if f.is_file()]
    written = sum(f.stat().st_size for f in files)
    intermediate = sum(f.stat().st_size for f in files if out not in f.parents)
    measured = {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "written": written}
    kernel = {"kernel": f"merge kernel: {summary['merge_kernel']}"} if "merge_kernel" in summary else {}
    print(json.dumps({**measured, "intermediate": intermediate, "peak_rss": peak_rss(), **kernel}))


def measure(engine: str, count: int, device: str = "cpu") -> dict:
    output_dir = CACHE / f"merge-{engine}-{count}"
    shutil.rmtree(output_dir, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, __file__, "--worker", engine, str(count), str(output_dir), device],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "output": output_dir / "merge"}


def io_floor() -> float:
    """Seconds to read the base's and the target's weights once (from the page cache, as the runs do) and write
    one output of the same size: what a merge cannot go below on this machine."""
    base, target, _ = archive(1)
    files = [*base.glob("*.safetensors"), *target.glob("*.safetensors")]
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm, as before each run
    buffer = bytearray(max(f.stat().st_size for f in files))
    started = time.perf_counter()
    for file in files:
        with open(file, "rb") as handle:
            handle.readinto(buffer)
    out = CACHE / "floor.bin"
    with open(out, "wb") as handle:
        handle.write(memoryview(buffer)[: files[0].stat().st_size])
    seconds = time.perf_counter() - started
    out.unlink()
    return seconds


def bench(count: int, reference: dict | None) -> tuple[dict, dict]:
    """One row: the fused engine, and the mergekit path unless `reference` (an earlier count's) is reused."""
    base, target, _ = archive(count)
    subprocess.run(f"cat {base}/*.safetensors {target}/*.safetensors > /dev/null", shell=True, check=True)
    load = os.getloadavg()[0]
    measured = reference is None
    if measured:
        reference = measure("mergekit", count)
    floor = io_floor()
    fused = {**measure("fused", count), "floor": floor}
    same = identical(fused["output"], reference["output"]) if measured else "n/a (mergekit path not rerun)"
    label = f"{reference['count']} adapters, reused" if not measured else "this run"
    print(
        f"{count:2d} adapters (load {load:.1f}-{os.getloadavg()[0]:.1f}): apply+mergekit [{label}] "
        f"{reference['seconds']:.1f}s (CPU {reference['cpu_seconds']:.1f}s) {reference['peak_rss'] / 1e9:.2f} GB, "
        f"intermediates {reference['intermediate'] / 1e9:.2f} GB | fused {fused['seconds']:.1f}s "
        f"(CPU {fused['cpu_seconds']:.1f}s) {fused['peak_rss'] / 1e9:.2f} GB, intermediates "
        f"{fused['intermediate'] / 1e9:.2f} GB | time {fused['seconds'] / reference['seconds']:.2f}x "
        f"RSS {fused['peak_rss'] / reference['peak_rss']:.2f}x | I/O floor {floor:.1f}s, fused "
        f"{fused['seconds'] / floor:.1f}x it | identical: {same} | {fused['kernel']}",
        flush=True,
    )
    shutil.rmtree(fused["output"].parent, ignore_errors=True)
    if measured:
        shutil.rmtree(reference["output"].parent, ignore_errors=True)
    return {**reference, "count": reference.get("count", count)}, fused


def goals(rows: dict[int, tuple[dict, dict]]) -> None:
    """Issue #32's goals, from the rows measured (a goal whose counts were not run is left out)."""

    def ratio(count: int) -> float:
        reference, fused = rows[count]
        return fused["seconds"] / reference["seconds"]

    checks = []
    if 1 in rows and 8 in rows:
        growth = rows[8][1]["peak_rss"] / rows[1][1]["peak_rss"]
        checks.append(("fused peak RSS, 8 vs 1 adapter", f"{growth:.2f}x", "<= 1.25x", growth <= 1.25))
    for count, limit in ((8, 0.30), (4, 0.40)):
        if count in rows:
            checks.append(
                (
                    f"fused time at {count} adapters vs mergekit path",
                    f"{ratio(count):.2f}x",
                    f"<= {limit}x",
                    ratio(count) <= limit,
                )
            )
    if 1 in rows:
        fused = rows[1][1]
        over_floor = fused["seconds"] / fused["floor"]
        checks.append(("fused time at 1 adapter vs the I/O floor", f"{over_floor:.1f}x", "<= 3x", over_floor <= 3))
    if 8 in rows and 16 in rows:
        growth = rows[16][1]["peak_rss"] / rows[8][1]["peak_rss"]
        checks.append(("fused peak RSS, 16 vs 8 adapters", f"{growth:.2f}x", "<= 1.0x (+2%)", growth <= 1.02))
    for name, value, goal, met in checks:
        print(f"goal: {name}: {value} (goal {goal}) {'met' if met else 'NOT met'}")


def fused_only(counts: list[int], device: str) -> None:
    """The fused merge alone, on `device` (a GPU check reports this time): no mergekit path, no comparison."""
    for count in sorted(counts):
        fused = measure("fused", count, device)
        print(
            f"{count:2d} adapters on {device} (load {os.getloadavg()[0]:.1f}): fused {fused['seconds']:.1f}s "
            f"(CPU {fused['cpu_seconds']:.1f}s) {fused['peak_rss'] / 1e9:.2f} GB | {fused['kernel']}",
            flush=True,
        )
        shutil.rmtree(fused["output"].parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("ENGINE", "COUNT", "OUTPUT_DIR", "DEVICE"))
    parser.add_argument("--adapters", type=int, nargs="*", default=[1, 4, 8, 16])
    parser.add_argument(
        "--reference-up-to",
        type=int,
        default=None,
        metavar="N",
        help="run the mergekit path (about 1.5 GB RSS per adapter) only up to N adapters and reuse "
        "its largest measurement above that",
    )
    parser.add_argument("--device", default="cpu", help="merge.device (and apply.device) of the runs")
    parser.add_argument("--fused-only", action="store_true", help="time the fused merge alone (e.g. on a GPU)")
    args = parser.parse_args()
    if args.worker:
        engine, count, output_dir, device = args.worker
        worker(engine, int(count), Path(output_dir), device)
        return
    if args.fused_only:
        fused_only(args.adapters, args.device)
        return
    if args.device != "cpu":
        parser.error("--device other than cpu needs --fused-only (the mergekit path's time on a GPU is not the point)")
    print(
        f"I/O floor (read base + target once, write the output once): {io_floor():.1f}s, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows, last_reference = {}, None
    for count in sorted(args.adapters):
        reuse = args.reference_up_to is not None and count > args.reference_up_to
        rows[count] = bench(count, last_reference if reuse else None)
        last_reference = rows[count][0]
    goals(rows)


if __name__ == "__main__":
    main()
