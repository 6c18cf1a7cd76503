"""The stages, in the order data flows through them; each module declares one `Stage` (`contract.py`).

Stage modules import torch, datasets, transformers, mergekit and huggingface_hub inside the functions that use them,
never at the top: planning imports every stage, and `--status` and `--dry-run` must start without them.
"""

from pipeline.stages import apply, archive, evaluate, export, merge, prepare, publish, search, train
from pipeline.stages.contract import Inputs, Stage, StageRef

STAGES: dict[str, Stage] = {
    module.STAGE.name: module.STAGE
    for module in (prepare, train, archive, apply, search, merge, evaluate, export, publish)
}

# What in a recipe gives each optional stage its items: said when a command asks for a stage that has none.
ENABLED_BY = {
    "prepare": "finetunes",
    "train": "finetunes",
    "archive": "finetunes",
    "apply": "adapters to merge and apply.save: true (or merge.engine: mergekit)",
    "search": "a search: block",
    "evaluate": "evaluate.enabled: true",
    "export": "an export: block (export.gguf)",
    "publish": "publish.repo_id",
}

__all__ = ["ENABLED_BY", "STAGES", "Inputs", "Stage", "StageRef"]
