"""Unsloth: `FastLanguageModel` loads the base (4-bit on GPU) and adds LoRA with its own gradient checkpointing.

`import unsloth` patches transformers and TRL for the whole process, so it happens here, inside `load_model`, only
when this backend trains; nothing imports this module's dependencies at package import.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.recipe import TrainConfig
from pipeline.training import environment


def load_model(base_dir: Path, config: TrainConfig, *, trust_remote_code: bool) -> tuple:
    """(peft model, tokenizer) for the base model in `base_dir`, LoRA added as `config.lora` says."""
    import unsloth  # noqa: F401  (patches transformers/TRL before anything below uses them)
    from unsloth import FastLanguageModel

    dtype = environment.weights_dtype(config)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(base_dir),
        max_seq_length=config.max_seq_length,
        dtype=dtype,
        load_in_4bit=environment.load_in_4bit(config),
        trust_remote_code=trust_remote_code,
        # The path is local: never swap it for an unsloth/* Hub alias (offline here, and the adapter must name
        # the real base).
        use_exact_model_name=True,
        use_safetensors=True,  # never a pickle: unpickling runs whatever code the file holds
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        use_rslora=config.lora.use_rslora,
        bias="none",
        use_gradient_checkpointing="unsloth" if config.gradient_checkpointing else False,
        random_state=config.seed,
    )
    return model, tokenizer


def uses_trainer_gradient_checkpointing(config: TrainConfig) -> bool:
    """Unsloth already wrapped the layers with its own (offloading) checkpointing; the Trainer must not add HF's."""
    return False
