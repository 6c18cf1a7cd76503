"""Benchmark the apply stage against PEFT's merge_and_unload on a Qwen2-0.5B-shaped random bf16 model.

    .venv/bin/python bench/apply.py                 # 24 and 48 layers; models cached under $TMPDIR/ftmerge-bench

Each side runs in its own process (peak RSS is the process's own ru_maxrss). Prints time and peak-RSS ratios, the
stage's bandwidth (bytes read + written per second) against `cp` of the same files, and checks bit-identity.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("FTMERGE_BENCH_DIR", Path(tempfile.gettempdir()) / "ftmerge-bench"))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen2_05b_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        use_sliding_window=False,
    )


def random_model(out_dir: Path, config, seed: int, like: Path | None = None) -> Path:
    """Random bf16 weights written tensor by tensor (no model object in memory); with `like`, those weights plus
    small noise, as an instruct model derives from its base."""
    from transformers import Qwen2ForCausalLM

    from pipeline.models.safetensors_io import ShardWriter, TensorReader, model_tensors

    if (out_dir / "config.json").is_file():
        return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with torch.device("meta"):
        state = Qwen2ForCausalLM(config).state_dict()
    layout = {name: (torch.bfloat16, tuple(t.shape)) for name, t in state.items() if name != "lm_head.weight"}
    generator = torch.Generator().manual_seed(seed)
    reader = TensorReader(model_tensors(like)) if like else None
    writer = ShardWriter(partial / "model.safetensors", layout)
    for name, (dtype, shape) in layout.items():
        noise = torch.randn(shape, generator=generator) * (0.002 if like else 0.02)
        writer.write(name, (reader.read(name).float() + noise).to(dtype) if like else noise.to(dtype))
    writer.close()
    config.torch_dtype = "bfloat16"
    config.save_pretrained(partial)
    partial.rename(out_dir)
    return out_dir


def random_adapter(out_dir: Path, config, seed: int, rank: int = 64) -> Path:
    """An r=64 PEFT LoRA on all seven projections with random nonzero A and B (fp32, as PEFT saves)."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    if (out_dir / "adapter_model.safetensors").is_file():
        return out_dir
    with torch.device("meta"):
        state = Qwen2ForCausalLM(config).state_dict()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".")[-1] in PROJECTIONS:
            out_features, in_features = tensor.shape
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJECTIONS).save_pretrained(out_dir)
    return out_dir


def inputs(layers: int) -> tuple[Path, Path]:
    config = qwen2_05b_config(layers)
    base = random_model(CACHE / f"base-{layers}", config, seed=0)
    target = random_model(CACHE / f"target-{layers}", config, seed=1, like=base)
    return target, random_adapter(CACHE / f"adapter-{layers}-0", config, seed=10)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over exec from the forked
    parent, so every child would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(kind: str, target: Path, adapter: Path, out: Path) -> None:
    """Runs in a child process: one apply, then one JSON line with seconds and peak RSS."""
    started = time.perf_counter()
    if kind == "stage":
        from pipeline.merging.adapted_model import apply_adapter

        apply_adapter(adapter, target, out, dtype="bfloat16", device="cpu")
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def measure(kind: str, target: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, __file__, "--worker", kind, str(target), str(adapter), str(out)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def identical(left: Path, right: Path) -> bool:
    from pipeline.models.safetensors_io import TensorReader, model_tensors

    ours, theirs = model_tensors(left), model_tensors(right)
    if sorted(ours) != sorted(theirs):
        return False
    with TensorReader(ours) as a, TensorReader(theirs) as b:
        return all(torch.equal(a.read(name), b.read(name)) for name in ours)


def copy_bandwidth(target: Path, scratch: Path) -> float:
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(target), str(scratch)], check=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - started
    return 2 * sum(f.stat().st_size for f in target.glob("*.safetensors")) / seconds


def bench(layers: int) -> dict:
    target, adapter = inputs(layers)
    subprocess.run(f"cat {target}/*.safetensors > /dev/null", shell=True, check=True)  # same warm cache for all
    stage = measure("stage", target, adapter, CACHE / "out-stage")
    peft = measure("peft", target, adapter, CACHE / "out-peft")
    same = identical(CACHE / "out-stage", CACHE / "out-peft")
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    stage_bandwidth = 2 * size / stage["seconds"]
    cp_bandwidth = copy_bandwidth(target, CACHE / "out-cp")
    print(
        f"{layers} layers ({size / 1e9:.2f} GB): "
        f"stage {stage['seconds']:.1f}s {stage['peak_rss'] / 1e9:.2f} GB | "
        f"PEFT {peft['seconds']:.1f}s {peft['peak_rss'] / 1e9:.2f} GB | "
        f"time {stage['seconds'] / peft['seconds']:.2f}x RSS {stage['peak_rss'] / peft['peak_rss']:.2f}x | "
        f"stage {stage_bandwidth / 1e9:.2f} GB/s vs cp {cp_bandwidth / 1e9:.2f} GB/s | bit-identical: {same}",
        flush=True,
    )
    for name in ("out-stage", "out-peft", "out-cp"):
        shutil.rmtree(CACHE / name, ignore_errors=True)
    return {"layers": layers, "stage": stage, "peft": peft, "identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "TARGET", "ADAPTER", "OUT"))
    parser.add_argument("--layers", type=int, nargs="*", default=[24, 48])
    args = parser.parse_args()
    if args.worker:
        kind, target, adapter, out = args.worker
        worker(kind, Path(target), Path(adapter), Path(out))
        return
    results = [bench(layers) for layers in args.layers]
    if len(results) == 2:
        small, large = results
        print(
            f"stage peak RSS {large['layers']} vs {small['layers']} layers: "
            f"{large['stage']['peak_rss'] / small['stage']['peak_rss']:.2f}x; PEFT: "
            f"{large['peft']['peak_rss'] / small['peft']['peak_rss']:.2f}x"
        )


if __name__ == "__main__":
    main()
