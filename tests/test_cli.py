"""`ftmerge`: the installed command takes exactly `python -m pipeline.run`'s flags, and both keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pipeline import cli, run

ROOT = Path(__file__).resolve().parents[1]


def options(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z-]*", help_text))


def help_of(command, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        command(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_ftmerge_run_has_the_flags_of_python_m_pipeline_run(capsys):
    ftmerge_help = help_of(cli.main, ["run", "--help"], capsys)
    module_help = help_of(run.main, ["--help"], capsys)
    assert "usage: ftmerge run" in ftmerge_help
    assert (
        options(ftmerge_help)
        == options(module_help)
        >= {"--stage", "--from", "--force", "--dry-run", "--status", "--set", "--verbose"}
    )


def test_the_console_script_is_declared_and_unknown_commands_exit_2(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ftmerge": "pipeline.cli:main"}
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_dry_run_prints_no_library_output():
    """Nothing but the plan: torchao's failed loads and torch's deprecations used to print here."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "recipes/qwen2_7b.yaml", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1] == "dry run: recipe is valid; nothing was loaded or written"
