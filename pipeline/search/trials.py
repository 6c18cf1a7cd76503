"""One search process: the target loaded once, each trial's merge written into its weights in memory by the fused
engine, scored on the search's small held-out subsets, judged, and reported to the study. Nothing is written to disk
but the study.

Everything a process needs is in a `SearchJob` of plain values, so the same function runs in the stage's process
and in spawned worker processes.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import console
from pipeline.evaluation.lineage import EvalSet, Evaluation, evaluate_set
from pipeline.search.coordination import DatabaseCoordination, FileCoordination, Heartbeat
from pipeline.search.objective import judge
from pipeline.search.space import Space, baselines, merge_settings, suggest
from pipeline.search.storage import Storage
from pipeline.search.study import is_full, open_study, run_trials

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
    storage: Storage
    study_name: str
    lock_path: Path  # the study's lock on one machine (a SQLite study); a database study locks in the database
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    device: str = "auto"
    trust_remote_code: bool = False
    cache_bytes: int = 0
    settings: dict = field(default_factory=dict)  # the recipe's other merge settings (dtype, engine, device, …)


class TrialRunner:
    """The loaded target and the merge's inputs, reused by every trial of this process."""

    def __init__(self, job: SearchJob):
        from pipeline.evaluation.models import ModelSpec, load_causal_lm
        from pipeline.merging.fused import FusedInputs, FusedOptions, FusedSources

        self.job = job
        self.inputs = FusedInputs(
            FusedSources(job.base_dir, job.target_dir, job.adapters, job.adapted_paths, job.apply_dtype),
            FusedOptions(job.device, job.trust_remote_code, cache_bytes=job.cache_bytes),
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
            load_adapted(self.inputs, name, self.model)
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


def coordination_for(job: SearchJob, say=print):
    """How this process takes turns with the others on the job's study: a file lock beside a SQLite study, the
    database's lock and Optuna's heartbeats on a database server."""
    if job.storage.shared:
        return DatabaseCoordination(job.storage, job.study_name, job.heartbeat, say=say)
    return FileCoordination(job.lock_path)


def work(job: SearchJob, on_trial=None, say=print) -> int:
    """Run trials of the job's study until it is full; the references are computed once per study (by whichever
    process gets there first, under the study's lock) and read by every other. Returns trials finished here; a
    study already full loads nothing."""
    study = open_study(job.storage, job.study_name, job.heartbeat)
    coordination = coordination_for(job, say)
    if coordination.call(lambda: is_full(study, job.total)):
        return 0
    runner = TrialRunner(job)
    try:

        def references_once() -> dict:
            with coordination.exclusive():
                references = references_of(study)
                if references is None:
                    references = runner.references()
                    study.set_user_attr(REFERENCES, references)
                return references

        references = coordination.call(references_once)
        return run_trials(
            study,
            total=job.total,
            baselines=baselines(job.space.adapters),
            suggest=lambda trial: suggest(trial, job.space),
            evaluate=lambda point: runner.evaluate(point, references),
            coordination=coordination,
            sampler=job.sampler,
            seed=job.seed,
            on_trial=on_trial,
        )
    finally:
        runner.close()


def work_in_parallel(job: SearchJob, workers: int, say=print) -> int:
    """This process and `workers - 1` spawned ones on the job's study; a worker that fails fails the whole. Prints a
    line per trial finished here (to the run's log) and draws a bar. Returns the trials this process finished."""
    started = time.time()
    best: list[float] = []  # the best objective among trials that pass the gate, once one has
    bar = console.open_task("search", total=job.total, unit="trials")

    def progress(number: int, label: str | None, result: dict) -> None:
        gate = "pass" if result["passes"] else "fail"
        print(
            f"search: trial {label or number}: objective {result['objective']:.3f}, gate {gate} "
            f"({time.time() - started:.0f}s)",
            flush=True,
        )
        if result["passes"]:
            best[:] = [max([*best, result["objective"]])]
        bar.advance(info=f"best passing {best[0]:.3f}" if best else "none passes the gate yet")

    context = multiprocessing.get_context("spawn")
    others = [context.Process(target=work, args=(job,), daemon=True) for _ in range(workers - 1)]
    for process in others:
        process.start()
    try:
        done = work(job, on_trial=progress, say=say)
    finally:
        bar.finish()
        for process in others:
            process.join()
    failed = [process.exitcode for process in others if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"search: {len(failed)} of {len(others)} worker processes failed (exit codes {failed})")
    return done
