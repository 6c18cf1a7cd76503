"""The search study's name is the same on every machine that has the same recipe and inputs: models identified by
content, never by path or file time; and another name when an input changes."""

from __future__ import annotations

import os
import shutil

from pipeline.fingerprint import model_fingerprint
from pipeline.search.identity import portable_model_identity, study_name


def test_a_models_identity_survives_a_copy_to_another_path_with_other_file_times(tiny_models, tmp_path):
    original = tiny_models["target"]
    copy = tmp_path / "elsewhere" / "target"
    shutil.copytree(original, copy, copy_function=shutil.copyfile)  # new mtimes, as another machine receives it
    for weights in copy.glob("*.safetensors"):
        os.utime(weights, ns=(1, 1))
    assert model_fingerprint(str(copy)) != model_fingerprint(str(original))  # the runner's own: file times
    assert portable_model_identity(str(copy)) == portable_model_identity(str(original))
    assert portable_model_identity("Qwen/Qwen2-7B") == portable_model_identity("Qwen/Qwen2-7B")


def test_a_model_trained_again_under_the_same_name_is_another_identity(tiny_models, tmp_path):
    copy = tmp_path / "target"
    shutil.copytree(tiny_models["target"], copy)
    (weights,) = copy.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte: same size, same header
    weights.write_bytes(bytes(data))
    assert portable_model_identity(str(copy)) != portable_model_identity(str(tiny_models["target"]))
    assert study_name("r", {"target": portable_model_identity(str(copy))}) != study_name(
        "r", {"target": portable_model_identity(str(tiny_models["target"]))}
    )
