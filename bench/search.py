"""Benchmark a search trial's merge: written into a loaded model in memory vs one fused merge written to disk.

    .venv/bin/python bench/search.py                  # 0.5B-shaped models cached under $TMPDIR/ftmerge-bench

Each side runs in its own process on the models of bench/merge.py (2 adapters, TIES): the fused merge stage writing
the published configuration to disk, and a search process merging K configurations (other weights each time) into one
loaded model with the inputs cached (`search.cache_gb`). Prints the time of a trial's merge against the disk merge
(the first trial reads and caches every input; later ones only rerun the merge kernel), and peak RSS for K = 2, 4
and 8 trials (flat: trials reuse one model and one cache), and issue #32's goal (a later trial <= 0.4x the disk
merge). Scoring is left out: it depends on the eval sets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from apply import CACHE, peak_rss
from merge import archive, measure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ADAPTERS = 2


def trials_worker(count: int) -> None:
    """Runs in a child process: `count` in-memory merges with different weights, one JSON line of measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.merging.config import build_mergekit_config, validate_mergekit_config
    from pipeline.merging.fused import FusedInputs, FusedOptions, FusedSources, load_merged
    from pipeline.recipe import MergeConfig
    from pipeline.search.space import baselines, merge_settings

    base, target, archive_dir = archive(ADAPTERS)
    names = sorted(p.name for p in archive_dir.iterdir())
    adapted = {name: str(CACHE / "apply" / name) for name in names}
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    seconds = []
    sources = FusedSources(base, target, {name: archive_dir / name for name in names}, adapted, "bfloat16")
    with FusedInputs(sources, FusedOptions("cpu", cache_bytes=16 << 30)) as inputs:
        for index in range(count):
            point = {**baselines(tuple(names))["published"], **{f"weight.{n}": 0.5 + 0.1 * index for n in names}}
            settings = MergeConfig.model_validate({**merge_settings(point), "adapters": names})
            config = validate_mergekit_config(build_mergekit_config(settings, adapted, str(base), str(target)))
            started = time.perf_counter()
            load_merged(inputs, config, model)
            seconds.append(time.perf_counter() - started)
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def run_trials(count: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--trials-worker", str(count)],
        check=True,
        text=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-worker", type=int)
    parser.add_argument("--trials", type=int, nargs="*", default=[2, 4, 8])
    args = parser.parse_args()
    if args.trials_worker:
        trials_worker(args.trials_worker)
        return
    base, target, _ = archive(ADAPTERS)
    subprocess.run(f"cat {base}/*.safetensors {target}/*.safetensors > /dev/null", shell=True, check=True)
    disk = measure("fused", ADAPTERS)
    print(
        f"fused merge to disk ({ADAPTERS} adapters, load {os.getloadavg()[0]:.1f}): {disk['seconds']:.1f}s, "
        f"peak RSS {disk['peak_rss'] / 1e9:.2f} GB | {disk['kernel']}"
    )
    first_rss, later_trials = None, []
    for count in args.trials:
        result = run_trials(count)
        first, later = result["seconds"][0], result["seconds"][1:]
        warm = sum(later) / len(later) if later else float("nan")
        later_trials += later
        first_rss = first_rss or result["peak_rss"]
        print(
            f"{count} trials in memory: first {first:.1f}s ({first / disk['seconds']:.2f}x the disk merge), "
            f"later {warm:.1f}s each ({warm / disk['seconds']:.2f}x) | peak RSS {result['peak_rss'] / 1e9:.2f} GB "
            f"({result['peak_rss'] / first_rss:.2f}x the {args.trials[0]}-trial run)",
            flush=True,
        )
    if later_trials:
        ratio = sum(later_trials) / len(later_trials) / disk["seconds"]
        verdict = "met" if ratio <= 0.4 else "NOT met"
        print(f"goal: a later trial vs the disk merge: {ratio:.2f}x (goal <= 0.4x) {verdict}")


if __name__ == "__main__":
    main()
