"""Plain transformers + PEFT: the base model with LoRA on its projection layers, 4-bit through bitsandbytes on GPU.

Used where Unsloth is not wanted or not installed, and under `torchrun`/`accelerate launch` for DDP on CPU (gloo) or
GPUs: each process loads the model on its own device and the Trainer wraps it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.recipe import TrainConfig
from pipeline.training import environment


def load_model(base_dir: Path, config: TrainConfig, *, trust_remote_code: bool) -> tuple:
    """(peft model, tokenizer) for the base model in `base_dir`, LoRA added as `config.lora` says."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    dtype = environment.weights_dtype(config)
    quantized = environment.load_in_4bit(config)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
    if environment.has_gpu():
        # Straight to the GPU, one full copy per process under DDP (each rank on its own): a 16-bit 7B staged in
        # CPU RAM first does not fit a Colab runtime, and 4-bit weights cannot be moved after loading.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        use_rslora=config.lora.use_rslora,
        target_modules=list(config.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    set_seed(config.seed)  # LoRA A is initialized randomly: same seed, same adapter (Unsloth takes random_state)
    return get_peft_model(model, lora), tokenizer


def uses_trainer_gradient_checkpointing(config: TrainConfig) -> bool:
    """Here the Trainer turns gradient checkpointing on (TRL then makes the inputs require grads for PEFT)."""
    return config.gradient_checkpointing
