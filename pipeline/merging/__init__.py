"""Applying LoRA adapters to the target and merging the adapted models: both engines and their mergekit config."""
