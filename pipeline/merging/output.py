"""What a merged model directory holds besides tensors: config, the target's tokenizer, lineage and a model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from pipeline.models.safetensors_io import TOKENIZER_FILES, copy_tokenizer_files
from pipeline.versions import library_versions

LOG = logging.getLogger(__name__)
# Special-token ids the merged model takes from the target: the instruct model ends turns with its own token.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def write_base_config(base_dir: Path, out_dir: Path, dtype: str, trust_remote_code: bool = False) -> None:
    """The config mergekit writes for a `models:` merge: the base's, with the merge dtype."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    config.torch_dtype = dtype
    config.save_pretrained(out_dir)


def adopt_target_files(out_dir: Path, target_dir: Path, *, keep_tokenizer: bool) -> None:
    """Give the merged model the target's special-token ids, generation_config and (unless mergekit rebuilt the
    vocabulary from `tokenizer_source`) its tokenizer and chat template; mergekit copies the base's."""
    out_dir, target_dir = Path(out_dir), Path(target_dir)
    if not keep_tokenizer:
        for name in TOKENIZER_FILES:
            (out_dir / name).unlink(missing_ok=True)
        copy_tokenizer_files(target_dir, out_dir)
    elif (target_dir / "generation_config.json").is_file():
        (out_dir / "generation_config.json").write_bytes((target_dir / "generation_config.json").read_bytes())
    target_config = json.loads((target_dir / "config.json").read_text())
    config = json.loads((out_dir / "config.json").read_text())
    config.update({key: target_config[key] for key in TOKEN_ID_KEYS if key in target_config})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def vocabulary_size(model_dir: Path) -> int | None:
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.is_file() else None


def warn_if_vocabulary_changed(out_dir: Path, target_dir: Path) -> str | None:
    before, after = vocabulary_size(target_dir), vocabulary_size(out_dir)
    if before == after:
        return None
    message = (f"tokenizer_source changed the vocabulary size from {before} (target) to {after}: mergekit rebuilt "
               "embed_tokens/lm_head to the tokenizer's length")
    LOG.warning(message)
    return message


def write_lineage(out_dir: Path, lineage: dict, mergekit_config: dict) -> None:
    """lineage.json (inputs with sha256, the mergekit config, library versions) and a README.md model card."""
    lineage = {**lineage, "mergekit_config": mergekit_config, "versions": library_versions()}
    (Path(out_dir) / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    rows = "\n".join(
        f"| {a['name']} | {a.get('dataset') or '?'} | {(a.get('sha256') or '?')[:16]} | {a.get('train') or ''} |"
        for a in lineage["adapters"])
    card = f"""---
base_model: {lineage['target']}
tags: [merge, mergekit, lora, ftmerge]
---
# {lineage['name']}

{lineage['target']} with {len(lineage['adapters'])} LoRA fine-tune(s) of {lineage['base']}, each applied to the
target and merged all at once with mergekit's `{mergekit_config['merge_method']}` over the base
(engine: {lineage['engine']}). Tokenizer, chat template and generation config are the target's.

| adapter | dataset | sha256 | training |
|---|---|---|---|
{rows}

## mergekit configuration
```yaml
{yaml.safe_dump(mergekit_config, sort_keys=False).rstrip()}
```

Library versions: {', '.join(f'{k} {v}' for k, v in lineage['versions'].items())}.
Made with ftmerge; `lineage.json` lists every input with its sha256.
"""
    (Path(out_dir) / "README.md").write_text(card)
