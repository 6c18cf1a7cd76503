"""Model files: resolving Hub ids to local snapshots, safetensors I/O, LoRA arithmetic, tiny test models."""
