"""train: a LoRA on the BASE model per fine-tune, with TRL's SFTTrainer through Unsloth or transformers + PEFT.

Resumable: the runner keeps the working directory of a killed run (same fingerprint) and passes it again as `out`;
training continues from its last complete checkpoint. The finished output is `adapter/`, `metrics.json` and
`log.jsonl`; the checkpoints are removed once the adapter is written.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.fingerprint import model_fingerprint
from pipeline.models.hub import check_model_reference, resolve_model
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef, each_finetune
from pipeline.training import environment


def config(recipe: Recipe, item: str) -> dict:
    return {
        "train": result_settings(recipe.train_config(item)),
        "base_model": recipe.base_model,
        "base_model_fingerprint": model_fingerprint(recipe.base_model),
        "trust_remote_code": recipe.trust_remote_code,
    }


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    return [StageRef("prepare", item)]


def check(recipe: Recipe, item: str) -> None:
    """The base model reference looks usable and the chosen backend is installed; loads nothing."""
    try:
        check_model_reference(recipe.base_model, "base_model")
        backend = recipe.train_config(item).backend
        if backend != "auto":
            environment.check_backend_installed(backend)
    except (FileNotFoundError, environment.TrainingUnavailable) as error:
        raise RecipeError(str(error)) from None


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.training.child import train_lora_in_child
    from pipeline.training.job import TrainingJob

    base_dir = resolve_model(recipe.base_model, "base_model", trust_remote_code=recipe.trust_remote_code)
    job = TrainingJob(
        base_dir,
        inputs.path("prepare", item),
        Path(out),
        recipe.train_config(item),
        base_model=recipe.base_model,
        trust_remote_code=recipe.trust_remote_code,
    )
    metrics = train_lora_in_child(job)
    kept = ("train_loss", "eval_loss", "steps", "tokens", "seconds", "backend", "resumed_from_step")
    return {key: metrics[key] for key in kept}


STAGE = Stage(
    name="train", items=each_finetune, config=config, depends_on=depends_on, check=check, run=run, resumable=True
)
