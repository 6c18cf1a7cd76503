"""The model card (README.md) of a published merge or set of adapters: front matter the Hub indexes, where every
weight came from, the mergekit config, the evaluation table when there is one, and how to run it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.models.hub import HUB_ID
from pipeline.publishing.model_index import model_index


@dataclass(frozen=True)
class Release:
    """What is published, and from which models: the card's subject. `what` is merged, adapters or both."""

    repo_id: str
    what: str
    recipe_name: str
    base_model: str
    target_model: str


def is_hub_id(reference: str) -> bool:
    """A Hub id the card may name in `base_model` (the Hub rejects a card whose base_model is a local path)."""
    return bool(HUB_ID.match(reference)) and not Path(reference).exists()


def find_license(target_dir: Path | None, target_model: str, token: str | None = None) -> str | None:
    """The target's license: from its local README.md front matter, else from its card on the Hub; None when
    neither can be read (offline, no card, no license field)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.repocard import metadata_load

    readme = Path(target_dir) / "README.md" if target_dir else None
    if readme is not None and readme.is_file():
        return (metadata_load(readme) or {}).get("license")
    if not is_hub_id(target_model):
        return None
    try:
        return ModelCard.load(target_model, token=token).data.license
    except (OSError, ValueError, EntryNotFoundError):
        return None


def origin(adapter: dict, manifest: dict) -> str:
    """Where an adapter came from, in one line, by the kind its manifest records."""
    kind = manifest.get("kind", "trained")
    if kind == "extracted":
        extraction = manifest.get("extraction", {})
        error = extraction.get("reconstruction_error_max")
        return f"extracted from `{extraction.get('model')}` at rank {extraction.get('rank')}" + (
            f" (max relative reconstruction error {error:.3f})" if error is not None else ""
        )
    if kind == "combined":
        combination = manifest.get("combination", {})
        parts = ", ".join(f"{s['name']} × {s['weight']}" for s in combination.get("sources", []))
        return f"PEFT `{combination.get('combination_type')}` of {parts}"
    if kind == "imported":
        return f"imported (trained on `{manifest.get('source', {}).get('base_model_name_or_path')}`)"
    return f"dataset `{adapter.get('dataset')}`"


def front_matter(release: Release, method: str, license_name: str | None) -> dict:
    merged = release.what != "adapters"
    bases = [release.target_model, release.base_model] if merged else [release.base_model]
    data = {"license": license_name} if license_name else {}
    hub_bases = [base for base in bases if is_hub_id(base)]
    if hub_bases:
        data.update(base_model=hub_bases, base_model_relation="merge" if merged else "adapter")
    data["library_name"] = "transformers" if merged else "peft"
    data["tags"] = list(dict.fromkeys(["merge", "mergekit", "lora", method]))
    return data


def transfer_cell(entry: dict | None) -> str:
    """An adapter's transfer as the card shows it: the ratio and the two scores it is made of."""
    if not entry or entry.get("transfer") is None:
        return "–"
    if entry["metric"] == "exact_match":
        return f"{entry['transfer']:.2f}× ({entry['adapted']:.0%} on the target / {entry['trained']:.0%} on the base)"
    return (
        f"{entry['transfer']:.2f}× (loss removed: {entry['gain_on_target']:.3f} on the target / "
        f"{entry['gain_on_base']:.3f} on the base)"
    )


def lineage_section(lineage: dict, manifests: dict[str, dict], method: str, transfer: dict | None = None) -> str:
    """Where each adapter came from, and (with the evaluation's `transfer`) how much of its skill it keeps on the
    target it was applied to."""
    transfer = transfer or {}
    rows = "\n".join(
        f"| {a['name']} | {manifests.get(a['name'], {}).get('kind', 'trained')} | "
        f"{origin(a, manifests.get(a['name'], {}))} | `{a.get('sha256')}` | {a.get('train') or '–'} |"
        + (f" {transfer_cell(transfer.get(a['name']))} |" if transfer else "")
        for a in lineage["adapters"]
    )
    header = (" transfer to the target (its skill there / on the base) |", "---|") if transfer else ("", "")
    return f"""## Lineage

- **Base** (the adapters' training model): `{lineage["base"]}`
- **Target** (the model the adapters are applied to): `{lineage["target"]}`
- **Merge**: mergekit `{method}` of every adapted model and the target, over the base (engine: {lineage["engine"]})

| adapter | kind | origin | sha256 of adapter_model.safetensors | training |{header[0]}
|---|---|---|---|---|{header[1]}
{rows}
"""


def usage_section(release: Release, adapter_names: list[str]) -> str:
    repo_id = release.repo_id
    parts = ["## Usage"]
    if release.what != "adapters":
        parts.append(f"""With transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
messages = [{{"role": "user", "content": "Hello!"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```""")
    if release.what != "merged" and adapter_names:
        parts.append(f"""Each LoRA adapter is in `adapters/<name>/`. It was trained on the base and is meant to be
applied to the target, with PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

target = AutoModelForCausalLM.from_pretrained("{release.target_model}", dtype="auto")
model = PeftModel.from_pretrained(target, "{repo_id}", subfolder="adapters/{adapter_names[0]}")
```""")
    return "\n\n".join(parts) + "\n"


def gguf_section(repo_id: str, gguf_files: dict[str, int], verification: dict | None = None) -> str:
    """The GGUF files (name → bytes) the export stage wrote with llama.cpp's converter, what llama.cpp's check of
    each found (`verification`, the export's verification.json), and how to run one."""

    def size(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

    checked = {result["file"]: result["summary"] for result in (verification or {}).get("files", {}).values()}
    rows = "\n".join(
        f"| `{name}` | {name.removesuffix('.gguf').rsplit('-', 1)[-1]} | {size(n)} | {checked.get(name, '–')} |"
        for name, n in gguf_files.items()
    )
    if verification and verification.get("verified"):
        check = (
            f"Before publishing, llama.cpp (`llama-completion`, greedy) ran each file on "
            f"{len(verification['prompts'])} chat prompts, {verification['max_new_tokens']} new tokens each, and its "
            f"text was compared with {verification['reference']} on the merged model."
        )
    else:
        reason = (verification or {}).get("reason", "the export predates the check")
        check = f"These files were not run by llama.cpp before publishing ({reason})."
    smallest = min(gguf_files, key=gguf_files.get)
    return f"""## GGUF

For llama.cpp, Ollama and LM Studio: the merged model converted by llama.cpp's own converter (`convert_hf_to_gguf`;
K-quants then by its `llama-quantize`), with the target's chat template and end-of-turn token. {check}

| file | type | size | llama.cpp check |
|---|---|---|---|
{rows}

```sh
hf download {repo_id} {smallest} --local-dir .
llama-cli -m {smallest} -cnv
```
"""


def model_card(
    release: Release,
    lineage: dict,
    mergekit_yaml: str,
    manifests: dict[str, dict],
    evaluation: str | None,
    license_name: str | None,
    gguf_files: dict[str, int] | None = None,
    lm_eval: dict | None = None,
    gguf_verification: dict | None = None,
    transfer: dict | None = None,
) -> str:
    """README.md for the published folder. `manifests` are the archived adapters' (name → manifest), for kinds;
    `gguf_files` the GGUF files published beside the merged model (name → bytes); `lm_eval` report.json's lm-eval
    section, whose scores of the merged model become the front matter's `model-index`; `gguf_verification` what
    llama.cpp's check of the GGUF files found; `transfer` report.json's transfer per adapter, a column of the lineage
    table."""
    method = lineage.get("mergekit_config", {}).get("merge_method") or lineage["engine"]
    names = [adapter["name"] for adapter in lineage["adapters"]]
    contents = {
        "merged": "A merged model",
        "adapters": "LoRA adapters",
        "both": "A merged model and the LoRA adapters it was made from",
    }[release.what]
    metadata = front_matter(release, method, license_name)
    if release.what != "adapters":  # the scores are the merged model's
        metadata.update(model_index(release.repo_id.split("/")[-1], lm_eval))
    sections = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---",
        f"# {release.repo_id.split('/')[-1]}",
        f"{contents}, made with ftmerge from the recipe `{release.recipe_name}`: {len(names)} LoRA fine-tune(s) of "
        f"`{lineage['base']}`, each applied to `{lineage['target']}`, then merged all at once with mergekit's "
        f"`{method}` over the base. The tokenizer, chat template and generation config are the target's.",
        lineage_section(lineage, manifests, method, transfer),
    ]
    if evaluation:
        sections.append(
            f"## Evaluation\n\nFrom ftmerge's evaluate stage, on each fine-tune's held-out split and the "
            f"retention sets{' and lm-eval-harness tasks' if (lm_eval or {}).get('results') else ''}."
            f"\n\n{evaluation.strip()}\n"
        )
    if release.what != "adapters":
        sections.append(f"## mergekit configuration\n\n```yaml\n{mergekit_yaml.rstrip()}\n```\n")
    sections.append(usage_section(release, names))
    if gguf_files:
        sections.append(gguf_section(release.repo_id, gguf_files, gguf_verification))
    versions = lineage.get("versions") or {}
    if versions:
        sections.append("Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n")
    return "\n\n".join(section.rstrip("\n") for section in sections) + "\n"
