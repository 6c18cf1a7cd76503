"""Bad input answered as a user expects: a bad recipe, argument or path exits 2 before anything runs, with one or two
lines naming the key or the file and no traceback on the screen; bad data fails its stage naming the file and the
line; and what a user must know reaches the screen under its step's line. One test per defect found by a hostile
tester (each reproduced from a scratch folder with the tiny models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers.cli import REPO
from helpers.cli import run_cli as cli


def recipe_file(directory: Path, models: dict, **changes) -> Path:
    recipe = {
        "name": "bad",
        "output_dir": str(directory / "run"),
        "base_model": str(models["base"]),
        "target_model": str(models["target"]),
        "finetunes": [
            {"name": "good", "dataset": {"path": str(REPO / "data_templates" / "alpaca.example.jsonl"), "eval_size": 1}}
        ],
        "train": {"max_seq_length": 256, "backend": "transformers", "load_in_4bit": False, "optim": "adamw_torch"},
        "evaluate": {"enabled": False},
        **changes,
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def assert_refused(result: subprocess.CompletedProcess, *expected: str, max_lines: int = 6) -> None:
    """Exit 2, the words expected, a short message and no traceback on the screen."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    for words in expected:
        assert words in result.stderr, (words, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) <= max_lines, result.stderr


def written(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.name != "recipe.yaml")


def test_a_yaml_alias_bomb_anywhere_is_refused_at_once(tiny_models, tmp_path):
    """9 levels of 9 aliases inside merge.parameters (a free-form mapping) expand to 387 million values: before, the
    recipe's validation walked them for minutes, growing without bound."""
    levels = ['    a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = recipe_file(tmp_path, tiny_models)
    path.write_text(path.read_text() + "merge:\n  parameters:\n" + "\n".join(levels) + "\n")
    started = time.monotonic()
    result = cli(path, "--dry-run", timeout=60)
    assert time.monotonic() - started < 30
    assert_refused(result, "recipe.yaml: its aliases expand it to more than 100,000 values")
    bomb = ("--set", "merge.parameters={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
            "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}")  # fmt: skip
    clean = recipe_file(tmp_path, tiny_models)
    assert_refused(cli(clean, *bomb, "--dry-run", timeout=60), "--set merge.parameters: its aliases expand it")
    assert written(tmp_path) == []


def test_bad_text_and_bad_set_values_exit_2_in_one_line(tiny_models, tmp_path):
    latin1 = tmp_path / "text" / "latin1.yaml"
    latin1.parent.mkdir()
    latin1.write_bytes(recipe_file(tmp_path, tiny_models).read_bytes() + b"# caf\xe9\n")
    assert_refused(cli(latin1, "--dry-run"), "latin1.yaml: not UTF-8 text (byte 0xe9", max_lines=1)
    path = recipe_file(tmp_path, tiny_models)
    assert_refused(cli(path, "--set", "train.lora=[1,"), "--set train.lora: not valid YAML: line 1", max_lines=1)
    result = cli(path, "--set", "name=!!python/object/apply:os.system [id]")
    assert_refused(result, "--set name: not valid YAML", "python/object/apply:os.system", max_lines=1)
    assert written(tmp_path) == ["text", "text/latin1.yaml"]


def test_output_dir_on_a_file_or_empty_is_refused_before_anything_is_written(tiny_models, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    path = recipe_file(tmp_path, tiny_models, output_dir=str(a_file))
    for args in ([path, "--dry-run"], [path]):
        assert_refused(cli(*args), f"output_dir: {a_file} cannot be a directory: {a_file} is a file")
    assert a_file.read_text() == "not a folder"
    assert_refused(cli(recipe_file(tmp_path, tiny_models, output_dir="")), "output_dir: empty")
    assert written(tmp_path) == ["a-file"]


def test_an_archive_under_a_file_or_inside_a_stage_folder_is_refused(tiny_models, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    under_file = recipe_file(tmp_path, tiny_models, archive_dir=str(a_file / "adapters"))
    assert_refused(cli(under_file, "--dry-run"), f"archive_dir: {a_file / 'adapters'} cannot be a directory")
    inside = recipe_file(tmp_path, tiny_models, archive_dir=str(tmp_path / "run" / "prepare"))
    assert_refused(
        cli(inside, "--dry-run"), f"archive.good: its output {tmp_path / 'run' / 'prepare' / 'good'} is the output"
    )
    assert written(tmp_path) == ["a-file"]


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a real unprivileged user's check by switching to nobody")
def test_an_archive_this_user_cannot_write_is_refused_before_anything_runs(tiny_models, tmp_path):
    """Root writes anywhere, so the check runs in a child switched to the real user `nobody` (the kernel decides,
    nothing is mocked): an archive folder it cannot write is a problem of the recipe, found by the check rather than
    by the lock's mkdir after the run started."""
    import pwd

    from pipeline import runner
    from pipeline.recipe import load_recipe

    shared = Path(tempfile.mkdtemp(prefix="ftmerge-shared-"))  # pytest's tmp_path is root's alone (0700)
    shared.chmod(0o755)
    locked = shared / "locked"
    locked.mkdir(mode=0o555)
    open_dir = shared / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    recipe = load_recipe(
        recipe_file(tmp_path, tiny_models, output_dir=str(open_dir / "run"), archive_dir=str(locked / "adapters"))
    )
    steps = runner.plan(recipe)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: become nobody, check, report, exit without running the parent's cleanup
        try:
            os.close(read_end)
            nobody = pwd.getpwnam("nobody")
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(write_end, json.dumps(runner.output_problems(recipe, steps)).encode())
        except BaseException as error:
            os.write(write_end, json.dumps([f"{type(error).__name__}: {error}"]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as report:
        problems = json.loads(report.read())
    os.waitpid(child, 0)
    assert problems == [
        f"archive_dir: {locked} is not writable by this user, so {locked / 'adapters'} cannot be written"
    ]
    assert list(open_dir.iterdir()) == []
    shutil.rmtree(shared)


@pytest.mark.parametrize("density", [1.5, 0])
def test_a_density_outside_0_1_is_refused(tiny_models, tmp_path, density):
    result = cli(recipe_file(tmp_path, tiny_models), "--set", f"merge.density={density}", "--dry-run")
    assert_refused(result, "merge.density: Input should be")


def test_a_stage_the_recipe_does_not_enable_and_status_with_run_flags(tiny_models, tmp_path):
    path = recipe_file(tmp_path, tiny_models)
    assert_refused(cli(path, "--stage", "export"), "stage export is not enabled by this recipe", "an export: block")
    assert written(tmp_path) == [], "no .lock, no logs/"
    refused = cli(path, "--status", "--force")
    assert refused.returncode == 2 and "--status shows every step and runs nothing" in refused.stderr
    said = cli(path, "--from", "search", "--dry-run")
    assert said.returncode == 0 and "stage search is not enabled by this recipe" in said.stdout


def test_trust_remote_code_is_said_on_the_screen(tiny_models, tmp_path):
    result = cli(recipe_file(tmp_path, tiny_models, trust_remote_code=True), "--dry-run")
    assert result.returncode == 0 and "trust_remote_code is on" in result.stdout


def test_the_old_spelling_of_the_published_fallback_is_accepted_with_a_hint(tiny_models, tmp_path):
    path = recipe_file(tmp_path, tiny_models)
    result = cli(path, "--set", "search.fallback=seed", "--status")
    assert result.returncode == 0, result.stderr
    result = cli(path, "--set", "search.fallback=seed", "--stage", "prepare", "--dry-run")
    assert "search.fallback: 'seed' is now spelled 'published'" in result.stdout, result.stdout + result.stderr


def prepare_with(tmp_path: Path, models: dict, data: Path, **dataset) -> subprocess.CompletedProcess:
    finetune = {"name": "good", "dataset": {"path": str(data), "eval_size": 1, **dataset}}
    return cli(recipe_file(tmp_path, models, finetunes=[finetune]), "--stage", "prepare")


def alpaca_rows(count: int, start: int = 0) -> list[str]:
    return [json.dumps({"instruction": f"say {i}", "output": f"{i}"}) for i in range(start, start + count)]


def test_data_files_that_cannot_be_read_name_the_file_line_and_cause(tiny_models, tmp_path):
    bad_byte = tmp_path / "bad-byte.jsonl"
    bad_byte.write_bytes(("\n".join(alpaca_rows(3)) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    result = prepare_with(tmp_path, tiny_models, bad_byte)
    assert result.returncode == 1
    assert f"{bad_byte}, line 4: not UTF-8 text (byte 0xe9 at column 21)" in result.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert f"{empty}: empty, no rows to read" in prepare_with(tmp_path, tiny_models, empty).stderr
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps([json.loads(row) for row in alpaca_rows(5)])[:-30])
    result = prepare_with(tmp_path, tiny_models, truncated)
    assert f"{truncated}, line 1, column" in result.stderr and "not valid JSON" in result.stderr
    assert "DatasetGenerationError" not in result.stderr


def test_a_column_mapped_to_a_missing_column_is_named_before_anything_runs(tiny_models, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(alpaca_rows(10)) + "\n")
    result = prepare_with(tmp_path, tiny_models, data, columns={"instruction": "problem"})
    assert_refused(result, "finetunes.0.dataset.columns: instruction → 'problem': no such column in", "instruction")
    assert "its rows have: instruction, output" in result.stderr


def test_rows_dropped_and_duplicates_removed_are_said_on_the_screen(tiny_models, tmp_path):
    data = tmp_path / "data.jsonl"
    rejected = [json.dumps({"instruction": "no answer"})] * 4 + ['{"instruction": ']  # 8 of 104 lines rejected
    data.write_text("\n".join([*alpaca_rows(96), *rejected, *rejected[:3]]) + "\n")
    result = prepare_with(tmp_path, tiny_models, data, max_reject_fraction=0.1)
    assert result.returncode == 0, result.stderr
    rejected_file = tmp_path / "run" / "prepare" / "good" / "rejected.jsonl"
    assert f"note: prepare good: 8 of 104 rows of {data} rejected" in result.stdout
    assert str(rejected_file) in result.stdout and rejected_file.is_file()
    duplicated = tmp_path / "duplicated.jsonl"
    duplicated.write_text("\n".join(alpaca_rows(1) * 50) + "\n")
    (tmp_path / "again").mkdir()
    result = prepare_with(tmp_path / "again", tiny_models, duplicated)
    assert result.returncode == 1
    assert "holds out 1 of 1 rows" in result.stderr and "49 duplicates removed" in result.stderr


def test_a_bug_in_a_check_is_reported_as_a_bug_not_as_the_recipes_fault(tiny_models, tmp_path, monkeypatch, capsys):
    """A check that raises anything but a RecipeError is ftmerge's fault: exit 1, said so, traceback in a file."""
    import dataclasses

    from pipeline import run
    from pipeline.stages import STAGES

    def broken_check(recipe, item):
        raise KeyError("a bug")

    monkeypatch.setitem(STAGES, "prepare", dataclasses.replace(STAGES["prepare"], check=broken_check))
    assert run.main([str(recipe_file(tmp_path, tiny_models)), "--dry-run"]) == 1
    error = capsys.readouterr().err
    assert "checking prepare.good failed: KeyError: 'a bug'" in error and "a bug in ftmerge" in error
    log = Path(error.rsplit("traceback in ", 1)[1].strip())
    assert "broken_check" in log.read_text()
