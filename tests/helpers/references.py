"""The reference results ftmerge's own are compared with: PEFT's merge_and_unload and the `mergekit-yaml` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers.models import load_model_tensors


def peft_reference(target_dir, adapter_dir, out_dir, dtype=torch.bfloat16):
    """What users run today: load the whole target, merge_and_unload, save in the same dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    return out_dir


def assert_identical(ours_dir, reference_dir):
    ours, reference = load_model_tensors(ours_dir), load_model_tensors(reference_dir)
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), f"{name} differs from PEFT's merge_and_unload"


def mergekit_yaml(config: Path, out: Path, *, fixed_layer_types: bool = False) -> Path:
    """`mergekit-yaml CONFIG OUT`; with `fixed_layer_types`, the same CLI under the engine's one config fix."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if fixed_layer_types:
        command = [
            sys.executable,
            "-c",
            "import sys; from mergekit.scripts.run_yaml import main; "
            "from pipeline.merging.mergekit_engine import layer_types_following_slices\n"
            "with layer_types_following_slices(): main(sys.argv[1:], standalone_mode=False)",
        ]
    else:
        command = [str(Path(sys.executable).with_name("mergekit-yaml"))]
    subprocess.run([*command, str(config), str(out)], check=True, env=env, capture_output=True, text=True)
    return out
