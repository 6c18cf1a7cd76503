"""The merge search: its baselines are the seed's merge and the sum over the target, a trial merged in memory equals
the fused merge written to disk, the judge's arithmetic, and the Optuna study's guarantees (two processes share one
study without doing a trial twice; a search killed with SIGKILL resumes to the same choice). Tiny real models."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.archive import ADAPTERS
from helpers.cli import REPO, TESTS, rerun_from_copy, run_cli, start_cli
from helpers.recipes import SEARCH, merge_recipe, write_search_recipe
from helpers.search_standin import SPACE, cheap_point_value
from helpers.stages import merge_with

from pipeline.merging.config import build_mergekit_config, validate_mergekit_config
from pipeline.recipe import MergeConfig
from pipeline.search.coordination import FileCoordination
from pipeline.search.objective import judge
from pipeline.search.space import baselines, merge_settings, suggest
from pipeline.search.study import choose, fail_abandoned, finished_trials, open_study, run_trials, sqlite_url


def config_for(point: dict, adapted: dict[str, str], base: str, target: str) -> dict:
    settings = MergeConfig.model_validate({**merge_settings(point), "adapters": list(adapted)})
    return build_mergekit_config(settings, adapted, base, target)


def trial_inputs(tiny_models, archive, adapted: dict[str, str], apply_dtype: str):
    """The search's in-memory merge inputs over the tiny lineage and its archived adapters, cached in memory."""
    from pipeline.merging.fused import FusedInputs, FusedOptions, FusedSources

    adapters = {name: archive / name for name in ADAPTERS}
    sources = FusedSources(tiny_models["base"], tiny_models["target"], adapters, adapted, apply_dtype)
    return FusedInputs(sources, FusedOptions("cpu", cache_bytes=1 << 30))


def test_published_baseline_is_the_published_recipes_merge():
    adapted = {name: f"/runs/x/apply/{name}" for name in ADAPTERS}
    published = config_for(baselines(ADAPTERS)["published"], adapted, "/m/base", "/m/target")
    assert published == build_mergekit_config(MergeConfig(), adapted, "/m/base", "/m/target")
    assert published["merge_method"] == "ties" and published["base_model"] == "/m/base"
    assert published["parameters"] == {"normalize": True, "int8_mask": True}
    assert [m["parameters"] for m in published["models"]] == [{"weight": 1.0, "density": 1.0}] * (len(ADAPTERS) + 1)
    total = config_for(baselines(ADAPTERS)["sum"], adapted, "/m/base", "/m/target")
    assert total["merge_method"] == "task_arithmetic" and total["base_model"] == "/m/target"
    assert [m["model"] for m in total["models"]] == list(adapted.values())  # the target is the base, not an input
    assert total["parameters"]["normalize"] is False


def test_judge_measures_learned_against_each_adapted_model_and_gates_on_retention():
    target = {"rev": {"exact_match": 0.1}, "copy": {"exact_match": 0.9}}
    adapted = {"rev": {"rev": {"exact_match": 0.9}, "copy": {"exact_match": 0.5}}}
    merged = {"rev": {"exact_match": 0.7}, "copy": {"exact_match": 0.81}}
    outcome = judge(merged, target, adapted, finetunes=["rev"], retention=["copy"], metric="exact_match", tolerance=0.1)
    assert outcome.learned["rev"] == pytest.approx(0.75) and outcome.kept["copy"] == pytest.approx(0.9)
    assert outcome.passes and outcome.objective == pytest.approx(0.75)
    worse = judge(
        {**merged, "copy": {"exact_match": 0.72}},
        target,
        adapted,
        finetunes=["rev"],
        retention=["copy"],
        metric="exact_match",
        tolerance=0.1,
    )
    assert not worse.passes and worse.violation == pytest.approx(0.1)
    by_loss = judge(
        {"rev": {"loss": 1.0}, "copy": {"loss": 0.5}},
        {"rev": {"loss": 3.0}, "copy": {"loss": 0.4}},
        {"rev": {"rev": {"loss": 0.5}}},
        finetunes=["rev"],
        retention=["copy"],
        metric="loss",
        tolerance=0.1,
    )
    assert by_loss.learned["rev"] == pytest.approx(0.8) and by_loss.kept["copy"] == pytest.approx(0.8)
    assert not by_loss.passes


def test_the_worst_objective_is_decided_by_the_least_learned_fine_tune():
    target = {"rev": {"exact_match": 0.0}, "sort": {"exact_match": 0.0}, "copy": {"exact_match": 1.0}}
    adapted = {"rev": {"rev": {"exact_match": 1.0}}, "sort": {"sort": {"exact_match": 0.8}}}
    lopsided = {"rev": {"exact_match": 1.0}, "sort": {"exact_match": 0.2}, "copy": {"exact_match": 1.0}}
    even = {"rev": {"exact_match": 0.6}, "sort": {"exact_match": 0.48}, "copy": {"exact_match": 1.0}}
    settings = {"finetunes": ["rev", "sort"], "retention": ["copy"], "metric": "exact_match", "tolerance": 0.05}
    mean = [judge(merged, target, adapted, **settings).objective for merged in (lopsided, even)]
    worst = [judge(merged, target, adapted, **settings, objective="worst").objective for merged in (lopsided, even)]
    assert mean == pytest.approx([0.625, 0.6]) and worst == pytest.approx([0.25, 0.6])


@pytest.mark.parametrize(
    "point",
    [
        baselines(ADAPTERS)["published"],
        baselines(ADAPTERS)["sum"],
        {
            "method": "ties",
            "base_model": "target",
            "normalize": False,
            **{f"weight.{n}": 0.7 for n in ADAPTERS},
            **{f"density.{n}": 0.6 for n in ADAPTERS},
        },
        {
            "method": "dare_ties",
            "base_model": "base",
            "normalize": True,
            "target_weight": 0.8,
            **{f"weight.{n}": 0.9 for n in ADAPTERS},
            **{f"density.{n}": 0.7 for n in ADAPTERS},
        },
        {"method": "linear", "normalize": True, "target_weight": 1.2, **{f"weight.{n}": 0.5 for n in ADAPTERS}},
    ],
    ids=["published", "sum", "ties-over-target", "dare_ties", "linear"],
)
def test_a_trial_merged_in_memory_equals_the_fused_merge_written_to_disk(tiny_models, archive, tmp_path, point):
    """What a trial scores is what the merge stage would write and evaluate would load (bf16 in both)."""
    from transformers import AutoModelForCausalLM

    from pipeline.merging.fused import load_merged
    from pipeline.recipe import Recipe

    recipe: Recipe = merge_recipe(tiny_models, archive, tmp_path)
    settings = merge_settings(point)
    written = merge_with(tiny_models, archive, tmp_path, tmp_path / "disk", "fused", **settings)
    on_disk = AutoModelForCausalLM.from_pretrained(written, dtype=torch.bfloat16).state_dict()
    adapted = {name: str((Path(recipe.output_dir) / "apply" / name).resolve()) for name in ADAPTERS}
    config = validate_mergekit_config(config_for(point, adapted, str(tiny_models["base"]), str(tiny_models["target"])))
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.bfloat16)
    with trial_inputs(tiny_models, archive, adapted, "bfloat16") as inputs:
        for _ in range(2):  # the second merge reads every input from the cache
            load_merged(inputs, config, model)
            in_memory = model.state_dict()
            assert in_memory.keys() == on_disk.keys()
            for name, tensor in on_disk.items():
                assert torch.equal(in_memory[name], tensor), name


def test_a_trial_merged_without_the_kernel_equals_one_merged_with_it(tiny_models, archive, monkeypatch):
    """Where the kernel is not built (no compiler), mergekit's code writes each block into the loaded model's
    parameters (grad mode is per thread: the blocks are merged on worker threads) and gives the kernel's weights."""
    from transformers import AutoModelForCausalLM

    from pipeline.merging import kernel
    from pipeline.merging.fused import load_merged

    adapted = {name: f"/apply/{name}" for name in ADAPTERS}
    weights = {f"weight.{name}": 0.5 + 0.25 * i for i, name in enumerate(ADAPTERS)}
    point = {**baselines(ADAPTERS)["published"], **weights}
    config = validate_mergekit_config(config_for(point, adapted, str(tiny_models["base"]), str(tiny_models["target"])))
    merged = {}
    for built in (True, False):
        if not built:
            monkeypatch.setattr(kernel, "extension", lambda: None)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.bfloat16)
        with trial_inputs(tiny_models, archive, adapted, "bfloat16") as inputs:
            load_merged(inputs, config, model)
        merged[built] = model.state_dict()
    for name, tensor in merged[True].items():
        assert torch.equal(merged[False][name], tensor), name


def test_sum_over_the_target_adds_each_adapters_own_delta(tiny_models, archive, tmp_path):
    """T + Σ (Aᵢ − T): the configuration the seed's YAML cannot express, checked against the adapted models."""
    from transformers import AutoModelForCausalLM

    from pipeline.merging.fused import load_adapted, load_merged

    adapted = {name: str(tmp_path / "apply" / name) for name in ADAPTERS}
    config = validate_mergekit_config(
        config_for(baselines(ADAPTERS)["sum"], adapted, str(tiny_models["base"]), str(tiny_models["target"]))
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.float32)
    target = {k: v.clone() for k, v in model.state_dict().items()}
    with trial_inputs(tiny_models, archive, adapted, "float32") as inputs:
        expected = {k: v.clone() for k, v in target.items()}
        for name in ADAPTERS:
            load_adapted(inputs, name, model)
            for key, value in model.state_dict().items():
                expected[key] += value - target[key]
        load_merged(inputs, config, model)
    merged = model.state_dict()
    changed = [key for key in expected if not torch.equal(expected[key], target[key])]
    assert changed  # the adapters do change the model
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=2e-2)  # mergekit merges in bfloat16


WORKER = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from helpers.search_standin import SPACE, cheap_point_value
from pipeline.search.space import baselines, suggest
from pipeline.search.coordination import FileCoordination
from pipeline.search.study import open_study, run_trials

storage, total, tests_dir, pause_at, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
study = open_study(storage, "s")
count = 0

def evaluate(point):
    global count
    count += 1
    if count == pause_at:  # the kill test: stop inside this trial until the test kills the process
        Path(marker).write_text("in trial")
        time.sleep(600)
    time.sleep(0.05)
    return cheap_point_value(point)

done = run_trials(study, total=total, baselines=baselines(SPACE.adapters), suggest=lambda t: suggest(t, SPACE),
                  evaluate=evaluate, coordination=FileCoordination(Path(storage.removeprefix("sqlite:///") + ".lock")),
                  seed=7)
print(json.dumps({"done": done}))
"""


def start_worker(storage: str, total: int, *, pause_at: int = 0, marker: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER,
            storage,
            str(total),
            str(TESTS),
            str(pause_at),
            str(marker or ""),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def search_here(storage: str, total: int) -> list[dict]:
    study = open_study(storage, "s")
    fail_abandoned(study)
    run_trials(
        study,
        total=total,
        baselines=baselines(SPACE.adapters),
        suggest=lambda t: suggest(t, SPACE),
        evaluate=cheap_point_value,
        coordination=FileCoordination(Path(storage.removeprefix("sqlite:///") + ".lock")),
        seed=7,
    )
    return finished_trials(study)


@pytest.mark.slow
def test_two_worker_processes_share_one_study_and_do_each_trial_once(tmp_path):
    storage = sqlite_url(tmp_path / "study.db")
    open_study(storage, "s")
    workers = [start_worker(storage, 12) for _ in range(2)]
    done = [json.loads(worker.communicate(timeout=300)[0])["done"] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    rows = finished_trials(open_study(storage, "s"))
    assert len(rows) == 12 and sum(done) == 12 and all(done)  # both worked, none twice, none too many
    assert [row["label"] for row in rows[:2]] == ["published", "sum"]  # the baselines are trials 0 and 1
    assert sorted(row["number"] for row in rows) == list(range(12))


KILLED_AFTER_ASK = r"""
import os, sys
from pathlib import Path
import optuna
sys.path.insert(0, sys.argv[2])
from helpers.search_standin import SPACE
from pipeline.search.coordination import FileCoordination
from pipeline.search.space import baselines, suggest
from pipeline.search.study import open_study, run_trials

ask = optuna.study.Study.ask

def ask_then_die(self, *args, **kwargs):
    ask(self, *args, **kwargs)
    os._exit(9)  # as a SIGKILL would: the moment the trial runs, before anything else is written

optuna.study.Study.ask = ask_then_die
storage = sys.argv[1]
run_trials(open_study(storage, "s"), total=4, baselines=baselines(SPACE.adapters), suggest=lambda t: suggest(t, SPACE),
           evaluate=None, coordination=FileCoordination(Path(storage.removeprefix("sqlite:///") + ".lock")), seed=7)
"""


def test_a_search_killed_the_moment_it_asked_for_a_trial_redoes_that_trial(tmp_path):
    """The trial a killed process left running names its owner from the start, so the resumed search fails it and
    redoes it: an ownerless running trial would hold a place of the study forever (one trial short)."""
    storage = sqlite_url(tmp_path / "study.db")
    open_study(storage, "s")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ASK, storage, str(TESTS)], cwd=REPO, capture_output=True
    )
    assert killed.returncode == 9, killed.stderr
    assert fail_abandoned(open_study(storage, "s")) == [0]
    rows = search_here(storage, 4)
    assert len(rows) == 4 and [row["label"] for row in rows[:2]] == ["published", "sum"]


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_to_the_same_choice(tmp_path):
    uninterrupted = search_here(sqlite_url(tmp_path / "reference.db"), 10)
    storage = sqlite_url(tmp_path / "study.db")
    open_study(storage, "s")
    marker = tmp_path / "in-trial"
    worker = start_worker(storage, 10, pause_at=6, marker=marker)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before = finished_trials(open_study(storage, "s"))
    assert len(before) == 5
    resumed = search_here(storage, 10)
    assert [row["number"] for row in resumed[:5]] == [row["number"] for row in before]  # not redone
    assert [row["point"] for row in resumed] == [row["point"] for row in uninterrupted]
    assert choose(resumed)["point"] == choose(uninterrupted)["point"]
    assert all(row["passes"] == (row["violation"] == 0) for row in resumed)


def newest_log(output_dir: Path) -> str:
    """The run's own log: what the stages print goes there, the screen gets progress and results."""
    return max((output_dir / "logs").glob("run-*.log"), key=lambda path: path.stat().st_mtime).read_text()


def completed_trials(study_db: Path) -> int:
    import sqlite3

    if not study_db.is_file():
        return 0
    with sqlite3.connect(study_db, timeout=30) as connection:
        try:
            return connection.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:  # the study's tables are being created
            return 0


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory, tiny_models, finetune_sets):
    directory = tmp_path_factory.mktemp("search-run")
    recipe = write_search_recipe(directory, tiny_models, finetune_sets)
    result = run_cli(recipe)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"recipe": recipe, "output": directory / "run", "stdout": result.stdout}


@pytest.mark.slow
def test_search_stage_writes_a_leaderboard_and_the_merge_uses_its_choice(searched_run):
    import yaml

    search_dir = searched_run["output"] / "search"
    board = json.loads((search_dir / "leaderboard.json").read_text())
    assert [t["label"] for t in board["trials"]] == ["published", "sum", "2", "3", "4"]
    assert all(set(t["scores"]) == {"reverse", "sort", "copy"} for t in board["trials"])
    chosen = yaml.safe_load((search_dir / "chosen.yml").read_text())
    row = next(t for t in board["trials"] if t["label"] == chosen["trial"])
    assert row["passes"] or board["fallback_to_published"]
    written = yaml.safe_load((searched_run["output"] / "merge" / "mergekit_config.yml").read_text())
    assert written == row["mergekit_config"]  # the merge stage ran the chosen trial's configuration
    lineage = json.loads((searched_run["output"] / "merge" / "lineage.json").read_text())
    assert lineage["search"]["chosen_trial"] == chosen["trial"]
    assert lineage["search"]["why"].startswith("the highest mean learned fraction")  # SEARCH's objective: mean
    assert (search_dir / "pareto.png").stat().st_size > 0
    assert "| published" in (search_dir / "leaderboard.md").read_text()


def test_the_lineage_names_the_worst_objective_when_the_search_used_it(tmp_path):
    from pipeline.recipe import Recipe
    from pipeline.search.leaderboard import write_outputs
    from pipeline.stages.contract import Inputs, StageRef
    from pipeline.stages.merge import chosen_settings

    row = {
        "number": 7,
        "label": "7",
        "objective": 0.5,
        "learned": {"a": 0.5},
        "kept": {"r": 1.0},
        "passes": True,
        "violation": 0.0,
        "merge": {"method": "ties", "base_model": "base", "include_target": True, "weight": 0.7, "models": {}},
    }
    write_outputs(tmp_path, [row], row, references={}, metric="loss", tolerance=0.05, fallback=False, objective="worst")
    recipe = Recipe.model_validate(
        {"name": "n", "base_model": "b", "target_model": "t", "search": {"objective": "worst"}}
    )
    settings, searched = chosen_settings(recipe, Inputs({StageRef("search"): tmp_path}))
    assert settings.weight == 0.7
    assert searched["why"].startswith("the highest learned fraction of the least-learned fine-tune")


@pytest.mark.slow
def test_search_killed_with_sigkill_resumes_without_redoing_trials(searched_run, tmp_path, tiny_models):
    copy = tmp_path / "run"
    args = rerun_from_copy(searched_run, copy, ("search", "merge"))
    study = copy / "search.partial" / "study.db"
    process = start_cli(*args, log=tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    while completed_trials(study) < 2:
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = completed_trials(study)
    result = run_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    board = json.loads((copy / "search" / "leaderboard.json").read_text())
    reference = json.loads((searched_run["output"] / "search" / "leaderboard.json").read_text())
    assert [t["point"] for t in board["trials"]] == [t["point"] for t in reference["trials"]]
    assert board["chosen"] == reference["chosen"]
    reported = [line for line in newest_log(copy).splitlines() if re.search(r"search: trial \S+: objective", line)]
    assert len(reported) == 5 - finished_before, reported  # finished trials were not redone
    redone = [line for line in result.stdout.splitlines() if "were left running by a killed search" in line]
    assert len(redone) <= 1 and all(line.startswith("  note: search: trials [") for line in redone), result.stdout


def test_bad_search_settings_exit_2_before_anything_runs(tiny_models, finetune_sets, tmp_path):
    cases = {
        "unknown method": ({"space": {"methods": ["tiess"]}}, "not a mergekit merge method"),
        "not searchable": ({"space": {"methods": ["slerp"]}}, "search.space.methods: 'slerp'"),
        "inverted range": ({"space": {"weight": [1.5, 0.2]}}, "search.space.weight"),
        "empty choices": ({"space": {"base_model": []}}, "search.space.base_model"),
        "unknown retention set": ({"retention": ["nope"]}, "search.retention: ['nope'] are not retention sets"),
    }
    for case, (change, expected) in cases.items():
        directory = tmp_path / case.replace(" ", "-")
        directory.mkdir()
        result = run_cli(write_search_recipe(directory, tiny_models, finetune_sets, {**SEARCH, **change}))
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert expected in result.stderr, (case, result.stderr)
        assert not (directory / "run").exists(), f"{case}: something was written before the error"


@pytest.mark.slow
def test_evaluate_scores_the_published_merge_beside_the_choice_and_caches_every_score(searched_run):
    report = json.loads((searched_run["output"] / "evaluate" / "report.json").read_text())
    chosen = json.loads((searched_run["output"] / "search" / "leaderboard.json").read_text())["chosen"]
    assert ("merged:published" in report["models"]) == (chosen != "published"), (chosen, report["models"])
    again = run_cli(searched_run["recipe"], "--stage", "evaluate", "--force")
    assert again.returncode == 0, again.stdout + again.stderr
    cached = [line for line in newest_log(searched_run["output"]).splitlines() if line.endswith("every score cached")]
    assert len(cached) == len(report["models"]), cached  # no model was loaded to be scored again
    rerun = json.loads((searched_run["output"] / "evaluate" / "report.json").read_text())
    assert rerun["results"] == report["results"]
