"""Library versions recorded in manifests and model cards, so a result can be traced to the code that made it."""

from __future__ import annotations

from importlib import metadata

LIBRARIES = ("torch", "transformers", "peft", "trl", "unsloth", "datasets", "accelerate", "mergekit", "ftmerge")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
