"""A mixture of experts from the archive, built by mergekit-moe: the target's attention, embeddings and norms, one
expert MLP per adapted model, a router per layer from each expert's prompts.

A Qwen2 target gives Qwen2-MoE (mergekit's "Qwen MoE": its one shared expert is the target's MLP); Llama and Mistral
give Mixtral. An expert's prompts default to samples of its own fine-tune's prepared train split, the user turns
rendered with the target's chat template up to the assistant's turn: what the router should send to it.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from pipeline.errors import ConfigProblem
from pipeline.recipe import MergeConfig, MoeConfig

TARGET = "target"
# model_type of the target → mergekit's output architecture name (its `architecture:` key)
ARCHITECTURES = {"qwen2": "Qwen MoE", "llama": "Mixtral", "mistral": "Mixtral"}
# Keys mergekit writes that a MoE's config.json must take over from the target's (the rest are new MoE keys)
MOE_CHANGED_KEYS = ("architectures", "model_type", "sliding_window", "use_sliding_window")


class MoeConfigError(ConfigProblem):
    """A mixture of experts mergekit-moe cannot build; `where` is the part of the merge settings it concerns."""


def expert_names(merge: MergeConfig, adapters: list[str]) -> list[str]:
    """The routed experts, in order: each adapter's adapted model, then the target with `include_target`."""
    return [*adapters, *([TARGET] if merge.include_target else [])]


def output_architecture(model_type: str) -> str:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise MoeConfigError(
            f"mergekit-moe builds a MoE from {', '.join(sorted(ARCHITECTURES))} models; the target is {model_type!r}",
            ("moe",),
        ) from None


def needs_prompts(moe: MoeConfig) -> bool:
    return moe.gate_mode != "random"


def check_moe(merge: MergeConfig, adapters: list[str], own_finetunes: set[str], model_type: str | None) -> None:
    """Everything about the MoE that can be known before a model is opened; MoeConfigError locating the problem."""
    moe = merge.moe
    experts = expert_names(merge, adapters)
    unknown = sorted(set(moe.experts) - set(experts))
    if unknown:
        raise MoeConfigError(f"{unknown} are not experts of this MoE ({experts})", ("moe", "experts"))
    if len(experts) < moe.experts_per_token:
        raise MoeConfigError(
            f"{moe.experts_per_token}, but the MoE has {len(experts)} expert(s) {experts}",
            ("moe", "experts_per_token"),
        )
    if model_type is not None:
        output_architecture(model_type)
    if not needs_prompts(moe):
        return
    for name in experts:
        given = moe.experts.get(name)
        if given is not None and given.positive_prompts:
            continue
        if name == TARGET:
            raise MoeConfigError(
                "the target is an expert (include_target) and no fine-tune's data stands for it; give its prompts, "
                "set include_target: false, or gate_mode: random",
                ("moe", "experts", TARGET, "positive_prompts"),
            )
        if name not in own_finetunes:
            raise MoeConfigError(
                f"{name} was trained by another recipe, so its prepared data is not in this run; give its prompts "
                "(or gate_mode: random)",
                ("moe", "experts", name, "positive_prompts"),
            )


def sample_prompts(train_dir: Path, tokenizer, count: int, max_tokens: int, seed: int) -> list[str]:
    """`count` rows of a prepared train split, each the turns before its first assistant turn rendered with the
    tokenizer's chat template and ended at the last turn's own words, then its last `max_tokens` tokens; text-format
    rows as they are, cut the same way. mergekit's `hidden` gate reads each prompt's last token at every layer (at
    layer 0 that is its embedding): ended by the template's end-of-turn or generation prompt, every expert's prompts
    would end alike and give the same router row."""
    from datasets import load_from_disk

    rows = load_from_disk(str(train_dir))
    if len(rows) == 0:
        raise ValueError(f"{train_dir}: the prepared train split is empty; no prompts to route with")
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(count, len(rows))))
    prompts = []
    for row in rows.select(picked):
        messages = row.get("messages")
        if messages:
            first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
            asked = messages[:first_answer] or messages[:1]
            text = tokenizer.apply_chat_template(asked, tokenize=False)
            last = asked[-1]["content"]
            text = text[: text.rindex(last) + len(last)] if last and last in text else text
        else:
            text = row["text"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
        prompts.append(tokenizer.decode(ids))
    return prompts


def build_moe_config(
    moe: MoeConfig,
    *,
    target: str,
    experts: dict[str, str],
    prompts: dict[str, list[str]],
    architecture: str,
    dtype: str,
) -> dict:
    """mergekit-moe's config: the target as the base, one expert per entry of `experts` (name → model path) with its
    prompts, and for Qwen2-MoE the target's MLP as the shared expert, routed by every expert's prompts."""

    def expert(name: str, path: str, positive: list[str]) -> dict:
        entry = {"source_model": path}
        if needs_prompts(moe):
            entry["positive_prompts"] = positive
            negative = moe.experts[name].negative_prompts if name in moe.experts else []
            if negative:
                entry["negative_prompts"] = list(negative)
        return entry

    config = {
        "base_model": target,
        "architecture": architecture,
        "gate_mode": moe.gate_mode,
        "dtype": dtype,
        "experts_per_token": moe.experts_per_token,
        "experts": [expert(name, path, prompts.get(name, [])) for name, path in experts.items()],
    }
    if architecture == ARCHITECTURES["qwen2"]:
        shared = {"source_model": target}
        if needs_prompts(moe):
            every = [prompt for name in experts for prompt in prompts.get(name, [])]
            shared["positive_prompts"] = moe.shared_expert.positive_prompts or list(dict.fromkeys(every))
            if moe.shared_expert.negative_prompts:
                shared["negative_prompts"] = list(moe.shared_expert.negative_prompts)
        config["shared_experts"] = [shared]
    return config


def run_moe(config_dict: dict, out_dir: Path, *, device: str, seed: int, trust_remote_code: bool = False) -> None:
    """Build the MoE into `out_dir` as `mergekit-moe CONFIG OUT --device D --random-seed S` does."""
    import transformers
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig, is_bad_config
    from mergekit.scripts.moe import build

    config = MoEMergeConfig.model_validate(copy.deepcopy(config_dict))
    if is_bad_config(config):  # mergekit logs why; its build() would exit the process
        raise MoeConfigError("mergekit-moe rejects the config (the reason is in the run's log)", ("moe",))
    transformers.trainer_utils.set_seed(seed)  # mergekit-moe --random-seed: the random gate draws from torch
    options = MergeOptions(device=device, trust_remote_code=trust_remote_code, write_model_card=False)
    build(config, str(out_dir), options, device=device)


def write_moe_config(out_dir: Path, target_dir: Path) -> None:
    """The target's config.json as it was, with the keys mergekit-moe's config adds (num_experts, ...) and the ones
    it must change (`MOE_CHANGED_KEYS`, dtype) taken from the config mergekit wrote through transformers 5, which
    would have moved `rope_theta` and dropped `torch_dtype`."""
    import torch

    from pipeline.models.safetensors_io import write_config

    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    written = json.loads((Path(out_dir) / "config.json").read_text())
    # dtype is written under both names by write_config; rope_parameters is transformers 5's move of rope_theta
    skipped = {"dtype", "torch_dtype", *(["rope_parameters"] if "rope_theta" in target_config else [])}
    added = {k: v for k, v in written.items() if k not in target_config and k not in skipped}
    changed = {k: written[k] for k in MOE_CHANGED_KEYS if k in written}
    dtype = written.get("dtype") or written.get("torch_dtype")
    write_config(Path(target_dir) / "config.json", out_dir, getattr(torch, dtype) if dtype else None, added | changed)
