"""One search process: the target loaded once, each trial's merge written into its weights in memory by the fused
engine, scored on the search's small held-out subsets, judged, and reported to the study. Nothing is written to disk
but the study.

Everything a process needs is in a `SearchJob` of plain values, so the same function runs in the stage's process
and in spawned worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.evaluation.lineage import EvalSet, Evaluation, evaluate_set
from pipeline.search.objective import judge
from pipeline.search.space import Space, baselines, merge_settings, suggest
from pipeline.search.study import open_study, run_trials

REFERENCES = "references"


@dataclass(frozen=True)
class SearchJob:
    base_dir: Path
    target_dir: Path
    adapters: dict[str, Path]  # adapter name → archived adapter directory
    adapted_paths: dict[str, str]  # adapter name → the path that names its adapted model in a mergekit config
    apply_dtype: str
    sets: list[EvalSet]
    evaluation: Evaluation
    finetunes: list[str]
    retention: list[str]
    metric: str
    tolerance: float
    objective: str
    space: Space
    total: int
    sampler: str
    seed: int
    storage: str
    study_name: str
    lock_path: Path
    device: str = "auto"
    trust_remote_code: bool = False
    cache_bytes: int = 0
    settings: dict = field(default_factory=dict)  # the recipe's other merge settings (dtype, engine, device, …)


class TrialRunner:
    """The loaded target and the merge's inputs, reused by every trial of this process."""

    def __init__(self, job: SearchJob):
        from pipeline.evaluation.models import ModelSpec, load_causal_lm
        from pipeline.merging.fused import FusedInputs

        self.job = job
        self.inputs = FusedInputs(
            base_dir=job.base_dir,
            target_dir=job.target_dir,
            apply_dtype=job.apply_dtype,
            adapters={job.adapted_paths[name]: path for name, path in job.adapters.items()},
            device=job.device,
            trust_remote_code=job.trust_remote_code,
            cache_bytes=job.cache_bytes,
        )
        evaluation = job.evaluation
        self.model = load_causal_lm(
            ModelSpec("target", "target", Path(job.target_dir)),
            dtype=evaluation.config.dtype,
            device=evaluation.device,
            trust_remote_code=job.trust_remote_code,
        )

    def close(self) -> None:
        self.inputs.close()

    def score(self, label: str) -> dict:
        """{set: metrics} of the model as its weights are now; examples dropped (the leaderboard keeps numbers)."""
        results = {s.name: evaluate_set(self.model, label, s, self.job.evaluation) for s in self.job.sets}
        return {name: {k: v for k, v in result.items() if k != "examples"} for name, result in results.items()}

    def references(self) -> dict:
        """The target's scores and each adapted model's, the yardsticks of every trial."""
        from pipeline.merging.fused import load_adapted

        target = self.score("target")
        adapted = {}
        for name in self.job.finetunes:
            load_adapted(self.inputs, self.job.adapted_paths[name], self.model)
            adapted[name] = self.score(f"adapted:{name}")
        return {"target": target, "adapted": adapted}

    def evaluate(self, point: dict, references: dict) -> dict:
        from pipeline.merging.config import validate_mergekit_config
        from pipeline.merging.fused import load_merged

        merge = merge_settings(point)
        config = mergekit_config(self.job, merge)
        load_merged(self.inputs, validate_mergekit_config(config), self.model)
        scores = self.score("trial")
        outcome = judge(
            scores,
            references["target"],
            references["adapted"],
            finetunes=self.job.finetunes,
            retention=self.job.retention,
            metric=self.job.metric,
            tolerance=self.job.tolerance,
            objective=self.job.objective,
        )
        return {"merge": merge, "mergekit_config": config, "scores": scores, **outcome.as_dict()}


def mergekit_config(job: SearchJob, merge: dict) -> dict:
    """The mergekit configuration the merge stage would write for these `merge:` settings."""
    from pipeline.merging.config import build_mergekit_config
    from pipeline.recipe import MergeConfig

    settings = MergeConfig.model_validate({**job.settings, **merge, "adapters": list(job.adapters)})
    return build_mergekit_config(settings, job.adapted_paths, str(job.base_dir), str(job.target_dir))


def references_of(study) -> dict | None:
    return study.user_attrs.get(REFERENCES)


def work(job: SearchJob, on_trial=None) -> int:
    """Run trials of the job's study until it is full; the references are computed once per study (by whichever
    process gets there first, under the study's lock) and read by every other. Returns trials finished here."""
    from pipeline.locking import wait_exclusive

    study = open_study(job.storage, job.study_name)
    runner = TrialRunner(job)
    try:
        with wait_exclusive(job.lock_path):
            references = references_of(study)
            if references is None:
                references = runner.references()
                study.set_user_attr(REFERENCES, references)
        return run_trials(
            study,
            total=job.total,
            baselines=baselines(job.space.adapters),
            suggest=lambda trial: suggest(trial, job.space),
            evaluate=lambda point: runner.evaluate(point, references),
            lock_path=job.lock_path,
            sampler=job.sampler,
            seed=job.seed,
            on_trial=on_trial,
        )
    finally:
        runner.close()
