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

__all__ = ["STAGES", "Inputs", "Stage", "StageRef"]
