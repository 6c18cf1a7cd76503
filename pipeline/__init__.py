"""ftmerge: continuous fine-tuning without forgetting (LoRA on the base, applied to the target, one TIES merge)."""

from importlib import metadata

try:
    __version__ = metadata.version("ftmerge")
except metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "unknown"
