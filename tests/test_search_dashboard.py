"""`ftmerge dashboard RECIPE`: optuna-dashboard on the recipe's search study, SQLite or PostgreSQL, checked headless
through its HTTP API (every trial with what it learned and kept per set, and the gate as its constraint), and, where
Debian's chromium is installed (`make browser`), screenshots of the study's pages taken headless (about 30 s;
`FTMERGE_SCREENSHOT_DIR` keeps the PNGs). The trials are scored by the
stand-in objective (tests/helpers/search_standin.py): the dashboard shows what the study holds, whatever made it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers.postgres import free_port
from helpers.search_standin import SPACE, cheap_point_value

from pipeline.search.coordination import DatabaseCoordination, FileCoordination, Heartbeat
from pipeline.search.space import baselines, suggest
from pipeline.search.storage import Storage, sqlite_storage
from pipeline.search.study import open_study, run_trials

REPO = Path(__file__).resolve().parents[1]
STUDY = "dash-0123456789ab"  # as the search names it: `<recipe name>-<identity hash>`
TRIALS = 5
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def fill_study(storage: Storage, coordination) -> None:
    run_trials(
        open_study(storage, STUDY, Heartbeat(1, 6)),
        total=TRIALS,
        baselines=baselines(SPACE.adapters),
        suggest=lambda trial: suggest(trial, SPACE),
        evaluate=cheap_point_value,
        coordination=coordination,
        seed=2,  # trial 2 breaks the gate
    )


def write_recipe(directory: Path, storage: str | None = None) -> Path:
    search = {"trials": TRIALS} if storage is None else {"trials": TRIALS, "storage": storage}
    recipe = {"name": "dash", "output_dir": str(directory / "run"), "base_model": "b", "target_model": "t"}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "search": search}))
    return path


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Dashboard:
    """`ftmerge dashboard` in a subprocess, on a free port, until the test ends."""

    def __init__(self, recipe: Path, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "dashboard", str(recipe), "--port", str(self.port)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.process.communicate()
            try:
                self.studies = get_json(f"{self.base}/api/studies")["study_summaries"]
                return
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)

    def trials(self, name: str) -> list[dict]:
        (study,) = [s for s in self.studies if s["study_name"] == name]
        return get_json(f"{self.base}/api/studies/{study['study_id']}")["trials"]

    def stop(self) -> tuple[str, str]:
        self.process.terminate()
        return self.process.communicate(timeout=30)


def assert_shows_the_search(trials: list[dict]) -> None:
    assert len(trials) == TRIALS and all(trial["state"] == "Complete" for trial in trials)
    for trial in trials:
        attributes = {attribute["key"]: attribute["value"] for attribute in trial["user_attrs"]}
        result = json.loads(attributes["result"])
        assert float(attributes["learned.a"]) == pytest.approx(result["learned"]["a"])
        assert float(attributes["learned.b"]) == pytest.approx(result["learned"]["b"])
        assert float(attributes["kept.copy"]) == pytest.approx(result["kept"]["copy"])
        assert trial["constraints"] == [pytest.approx(result["violation"])]  # the gate: > 0 breaks it
    assert any(trial["constraints"][0] > 0 for trial in trials) and any(t["constraints"][0] == 0 for t in trials)


def test_the_dashboard_lists_a_sqlite_studys_trials_with_learned_kept_and_the_gate(tmp_path):
    recipe = write_recipe(tmp_path)
    search_dir = tmp_path / "run" / "search"
    search_dir.mkdir(parents=True)
    fill_study(sqlite_storage(search_dir / "study.db"), FileCoordination(search_dir / "study.lock"))
    dashboard = Dashboard(recipe)
    try:
        assert_shows_the_search(dashboard.trials(STUDY))
    finally:
        stdout, _ = dashboard.stop()
    study_id = next(s["study_id"] for s in dashboard.studies if s["study_name"] == STUDY)
    assert f"dashboard: study {STUDY}: {dashboard.base}/dashboard/studies/{study_id}" in stdout


def test_the_dashboard_on_postgres_shows_the_trials_and_never_the_password(tmp_path, postgres):
    url = postgres.new_database()
    storage = Storage(url)
    fill_study(storage, DatabaseCoordination(storage, STUDY, Heartbeat(1, 6)))
    recipe = write_recipe(tmp_path, "${FTMERGE_SEARCH_STORAGE}")
    dashboard = Dashboard(recipe, env={"FTMERGE_SEARCH_STORAGE": url})
    try:
        trials = dashboard.trials(STUDY)
        assert_shows_the_search(trials)
        assert {attribute["key"] for attribute in trials[0]["user_attrs"]} >= {"worker", "label"}
        answers = json.dumps([dashboard.studies, trials, get_json(f"{dashboard.base}/api/meta")])
        assert postgres.password not in answers
    finally:
        stdout, stderr = dashboard.stop()
    assert "postgresql://postgres:***@127.0.0.1" in stdout
    assert postgres.password not in stdout + stderr


@pytest.mark.screenshot
def test_a_screenshot_of_the_study_page_shows_its_trials(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium (make browser)")
    recipe = write_recipe(tmp_path)
    search_dir = tmp_path / "run" / "search"
    search_dir.mkdir(parents=True)
    fill_study(sqlite_storage(search_dir / "study.db"), FileCoordination(search_dir / "study.lock"))
    dashboard = Dashboard(recipe)
    browse = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    folder = Path(os.environ.get("FTMERGE_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    pages = {}
    try:
        study_id = next(s["study_id"] for s in dashboard.studies if s["study_name"] == STUDY)
        for name, page in (("study", ""), ("trials", "/trials")):
            url = f"{dashboard.base}/dashboard/studies/{study_id}{page}"
            screenshot = folder / f"dashboard-{name}.png"
            shot = subprocess.run(
                [*browse, "--window-size=1400,1000", f"--screenshot={screenshot}", url],
                capture_output=True,
                timeout=180,
            )
            assert shot.returncode == 0 and screenshot.stat().st_size > 20_000, shot.stderr[-2000:]
            dom = subprocess.run([*browse, "--dump-dom", url], capture_output=True, text=True, timeout=180)
            assert dom.returncode == 0, dom.stderr[-2000:]
            pages[name] = dom.stdout
    finally:
        dashboard.stop()
    assert ">Infeasible<" in pages["study"]  # the timeline (and history, in gray) mark the trial that breaks the gate
    for number in range(TRIALS):  # the trial list shows every trial, with the search's attributes
        assert f"Trial {number}" in pages["trials"]
    assert "learned.a" in pages["trials"] and "kept.copy" in pages["trials"]
