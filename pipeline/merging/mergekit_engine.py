"""The reference engine: mergekit's `run_merge` over the adapted models the apply stage wrote."""

from __future__ import annotations

import copy
from pathlib import Path

# Seed for methods that prune at random (dare_*, della*), so a rerun gives the same tensors.
MERGE_SEED = 0


def run_mergekit(
    config_dict: dict,
    out_dir: Path,
    *,
    device: str = "auto",
    low_cpu_memory: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """Merge into `out_dir` exactly as `mergekit-yaml` would (same config, same options that affect tensors).

    mergekit mutates the config it is given and caches loaders per model path at class level, so a second merge in
    one process would read stale tensors: we pass a fresh parse and clear the cache around the run. Paths must be
    absolute and the model card off (its Hub lookup fails offline)."""
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, run_merge

    for entry in [config_dict.get("base_model", "/"), *(m["model"] for m in config_dict["models"])]:
        if not Path(entry).is_absolute():
            raise ValueError(f"mergekit config: model path {entry} must be absolute")
    config = MergeConfiguration.model_validate(copy.deepcopy(config_dict))
    options = MergeOptions(
        device=device,
        low_cpu_memory=low_cpu_memory,
        trust_remote_code=trust_remote_code,
        write_model_card=False,
        random_seed=MERGE_SEED,
    )
    LoaderCache().loaders.clear()
    try:
        run_merge(config, str(out_dir), options)
    finally:
        LoaderCache().loaders.clear()
