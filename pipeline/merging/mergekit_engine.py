"""The reference engine: mergekit's `run_merge` over the adapted models the apply stage wrote."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from pipeline.merging.config import config_entries

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

    for entry in [config_dict.get("base_model", "/"), *(m["model"] for m in config_entries(config_dict))]:
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
        with layer_types_following_slices():
            run_merge(config, str(out_dir), options)
    finally:
        LoaderCache().loaders.clear()


@contextlib.contextmanager
def layer_types_following_slices():
    """mergekit 0.1.5 sets `num_hidden_layers` for a slice merge that changes the layer count but keeps the base's
    transformers 5 `layer_types` list, and transformers 5.17 refuses to save that config ("`num_hidden_layers` (5)
    must be equal to the number of `layer_types` (2)") after every tensor is written; `mergekit-yaml` fails the same
    way. While merging, the output config's `layer_types` is each slice's first source's, in slice order."""
    import mergekit.merge

    original = mergekit.merge._model_out_config

    def model_out_config(config, arch_info, trust_remote_code=False):
        result = original(config, arch_info, trust_remote_code)
        if config.slices and getattr(result, "layer_types", None) is not None:
            layer_types = []
            for piece in config.slices:
                source = piece.sources[0]
                kinds = source.model.config(trust_remote_code=trust_remote_code).layer_types
                layer_types += list(kinds[source.layer_range[0] : source.layer_range[1]])
            if len(layer_types) == result.num_hidden_layers:
                result.layer_types = layer_types
        return result

    mergekit.merge._model_out_config = model_out_config
    try:
        yield
    finally:
        mergekit.merge._model_out_config = original
