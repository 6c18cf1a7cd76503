"""Training a LoRA on the base model: the data the prepare stage wrote, a backend that loads the model and adds LoRA
(Unsloth or plain transformers + PEFT), and TRL's SFTTrainer underneath both.

    from pipeline.training.trainer import TrainingJob, train_lora

The train stage (pipeline/stages/train.py) is a thin layer over `train_lora`; notebooks may call it directly.
"""
