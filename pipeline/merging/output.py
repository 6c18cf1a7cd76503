"""What a merged model directory holds besides tensors: config, the target's tokenizer, the mergekit configuration,
lineage and a model card. The configuration and the lineage are written and read here only (`write_merge_config`,
`read_merge_config`, `write_lineage`, `read_lineage`): evaluate and publish read a merge through them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from pipeline.models.safetensors_io import TOKENIZER_FILES, copy_tokenizer_files, write_config
from pipeline.versions import library_versions

# What a merge can really change in the target's config: the vocabulary (mergekit's tokenizer_source) and the number
# of layers (slices), with transformers 5's per-layer list when the target's config has one.
MERGE_CHANGED_KEYS = ("vocab_size", "num_hidden_layers", "layer_types")
# The mergekit configuration the merge ran (`mergekit-yaml` reruns it), and where every input came from.
MERGE_CONFIG_FILE, LINEAGE_FILE, CARD_FILE = "mergekit_config.yml", "lineage.json", "README.md"


def write_merge_config(out_dir: Path, mergekit_config: dict) -> None:
    (Path(out_dir) / MERGE_CONFIG_FILE).write_text(yaml.safe_dump(mergekit_config, sort_keys=False), encoding="utf-8")


def read_merge_config(merged_dir: Path) -> dict:
    return yaml.safe_load((Path(merged_dir) / MERGE_CONFIG_FILE).read_text(encoding="utf-8"))


def merge_config_text(merged_dir: Path) -> str:
    """The configuration as written (comments and order kept), for a model card."""
    return (Path(merged_dir) / MERGE_CONFIG_FILE).read_text(encoding="utf-8")


def read_lineage(merged_dir: Path) -> dict:
    return json.loads((Path(merged_dir) / LINEAGE_FILE).read_text(encoding="utf-8"))


def write_base_config(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """The config mergekit writes for a `models:` merge: the base's, with the merge dtype (copied as JSON; the
    target's replaces it in `adopt_target_files`)."""
    write_config(Path(base_dir) / "config.json", out_dir, getattr(torch, dtype))


def adopt_target_files(out_dir: Path, target_dir: Path, *, keep_tokenizer: bool) -> None:
    """Give the merged model the target's config.json as it was, with only the dtype and what the merge changed
    (`MERGE_CHANGED_KEYS`) taken from the config the engine wrote; its generation_config and (unless mergekit
    rebuilt the vocabulary from `tokenizer_source`) its tokenizer and chat template; mergekit copies the base's.
    mergekit saves its config through transformers 5, which moves Qwen2's `rope_theta` into `rope_parameters`,
    drops `torch_dtype` and nulls `sliding_window`: transformers 4.x, vLLM and llama.cpp then read rope_theta as
    10000, a broken model that loads fine."""
    out_dir, target_dir = Path(out_dir), Path(target_dir)
    if not keep_tokenizer:
        adopt_target_tokenizer(out_dir, target_dir)
    elif (target_dir / "generation_config.json").is_file():
        (out_dir / "generation_config.json").write_bytes((target_dir / "generation_config.json").read_bytes())
    target_config = json.loads((target_dir / "config.json").read_text())
    written = json.loads((out_dir / "config.json").read_text())
    changed = {
        key: written[key]
        for key in MERGE_CHANGED_KEYS
        if key in target_config and key in written and written[key] != target_config[key]
    }
    dtype = written.get("dtype") or written.get("torch_dtype")
    write_config(target_dir / "config.json", out_dir, getattr(torch, dtype) if dtype else None, changed)


def adopt_target_tokenizer(out_dir: Path, target_dir: Path) -> None:
    """The target's tokenizer, chat template and generation_config, as they are, in place of the ones mergekit
    saved (the base's, or for mergekit-moe the target's re-saved with its pad token set to bos or eos)."""
    for name in TOKENIZER_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)
    copy_tokenizer_files(target_dir, out_dir)


def vocabulary_size(model_dir: Path) -> int | None:
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.is_file() else None


def vocabulary_change(out_dir: Path, target_dir: Path) -> str | None:
    """What changed, in words, when the merged vocabulary's size is not the target's; None when it is the same."""
    before, after = vocabulary_size(target_dir), vocabulary_size(out_dir)
    if before == after:
        return None
    return (
        f"the merged tokenizer changed the vocabulary size from {before} (target) to {after}: mergekit rebuilt "
        "embed_tokens/lm_head to the merged tokenizer's length (pad_to_multiple_of pads it)"
    )


def write_lineage(out_dir: Path, lineage: dict, mergekit_config: dict) -> None:
    """lineage.json (inputs with sha256, the mergekit config, library versions) and a README.md model card."""
    lineage = {**lineage, "mergekit_config": mergekit_config, "versions": library_versions()}
    (Path(out_dir) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
    rows = "\n".join(
        f"| {a['name']} | {a.get('dataset') or '?'} | {(a.get('sha256') or '?')[:16]} | {a.get('train') or ''} |"
        for a in lineage["adapters"]
    )
    if "experts" in mergekit_config:
        how = (
            f"built into a mixture of experts by mergekit-moe ({mergekit_config['architecture']}, "
            f"gate_mode {mergekit_config['gate_mode']}, {len(mergekit_config['experts'])} experts) on the target"
        )
    else:
        how = f"merged all at once with mergekit's `{mergekit_config['merge_method']}` over the base"
    card = f"""---
base_model: {lineage["target"]}
tags: [merge, mergekit, lora, ftmerge]
---
# {lineage["name"]}

{lineage["target"]} with {len(lineage["adapters"])} LoRA fine-tune(s) of {lineage["base"]}, each applied to the
target and {how}
(engine: {lineage["engine"]}). Tokenizer, chat template and generation config are the target's.

| adapter | dataset | sha256 | training |
|---|---|---|---|
{rows}

## mergekit configuration
```yaml
{yaml.safe_dump(mergekit_config, sort_keys=False).rstrip()}
```

Library versions: {", ".join(f"{k} {v}" for k, v in lineage["versions"].items())}.
Made with ftmerge; `lineage.json` lists every input with its sha256.
"""
    (Path(out_dir) / CARD_FILE).write_text(card, encoding="utf-8")
