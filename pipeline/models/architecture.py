"""The config.json keys that say whether two models share an architecture (read without importing torch)."""

# Same values in a base and a target: an adapter trained on one fits the other's tensors.
ARCHITECTURE_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# What an archive manifest keeps of its base's config: the architecture and the vocabulary.
BASE_CONFIG_KEYS = (*ARCHITECTURE_KEYS, "vocab_size")
