"""What one LoRA training run is given, as a value: the train stage builds it, `trainer.train_lora` takes it, and
the child process that trains (pipeline/training/child.py) receives it as JSON. Imports nothing heavy, so the
runner's process can build one without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from pipeline.recipe import TrainConfig


@dataclass(frozen=True)
class TrainingJob:
    """One LoRA to train: the base in `base_dir`, the prepare stage's splits in `prepare_dir`, checkpoints and results
    in `workdir`. `base_model` is the reference the recipe gives, written into the adapter's config. A plain value, so
    the train stage's child process receives exactly what `train_lora` takes (`as_json` / `from_json`)."""

    base_dir: Path
    prepare_dir: Path
    workdir: Path
    config: TrainConfig
    base_model: str
    trust_remote_code: bool = False
    PATHS: ClassVar[tuple[str, ...]] = ("base_dir", "prepare_dir", "workdir")

    def as_json(self) -> dict:
        """Every field, paths as strings and the train block as its recipe keys."""
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        return data | {key: str(data[key]) for key in self.PATHS} | {"config": self.config.model_dump()}

    @classmethod
    def from_json(cls, data: dict) -> TrainingJob:
        paths = {key: Path(data[key]) for key in cls.PATHS}
        return cls(**data | paths | {"config": TrainConfig.model_validate(data["config"])})
