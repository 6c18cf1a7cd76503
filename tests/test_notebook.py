"""The Colab notebook: stored clean, parameterised, holding no logic of its own; executed headless on CPU against the
tiny recipe (Drive off) it runs every stage, and a second execution (a new "session") skips every stage.
Also the helpers it calls (pipeline/notebook.py). Colab itself (google.colab) cannot exist here: a small stand-in
replaces its secrets API where a test needs it. The Hub neither: the push cell runs the publish stage with
`publish.dry_run`, which assembles the folder and card without uploading."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import nbformat
import pytest
import tomllib

from pipeline import notebook
from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "finetune_then_merge.ipynb"
SMALL_RUN = [
    "train.max_steps=4",
    "train.save_steps=2",
    "train.warmup_steps=0",
    "train.logging_steps=1",
    "evaluate.max_samples=8",
    "search.trials=3",
    "search.max_samples=8",
]


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_stored_notebook_is_clean_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = _code_cells(nb)
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "store it without outputs"
    assert [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])] == [code[0]]
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert index > 0 and nb.cells[index - 1].cell_type == "markdown", f"code cell {cell.id}: no markdown line"
    stage_cells = [cell.id for cell in code if "notebook.run_stage(" in cell.source]
    assert [*stage_cells, "publish"] == list(STAGES), "one cell per stage, in the runner's order; publish is cell 7"
    assert "notebook.push_to_hub(" in code[-1].source
    assert not any("def " in cell.source or "class " in cell.source for cell in code), "logic belongs in pipeline/"


def _parameters(nb) -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(_code_cells(nb)[0].source, namespace)
    return {key: value for key, value in namespace.items() if key.isupper()}


def test_parameters_cell_defaults_point_at_a_shipped_recipe():
    parameters = _parameters(nbformat.read(NOTEBOOK, as_version=4))
    assert (ROOT / parameters["RECIPE"]).is_file()
    assert parameters["MOUNT_DRIVE"] is True and parameters["PUSH_TO_HUB"] is False


def test_storage_overrides_move_relative_dirs_under_the_storage_folder(tmp_path):
    storage = tmp_path / "My Drive: ftmerge #1"
    session = notebook.Session(Path("recipes/qwen2_7b.yaml"), storage)
    recipe = session.load()
    assert Path(recipe.output_dir) == storage / "runs" / "replete-qwen2-7b"
    assert Path(recipe.archive_dir) == storage / "adapters" / "qwen2-7b"
    session.overrides = [f"output_dir={tmp_path / 'elsewhere'}"]
    assert Path(session.load().output_dir) == tmp_path / "elsewhere", "an absolute path is kept as given"


def test_storage_root_outside_colab_is_a_local_folder(tmp_path):
    assert notebook.storage_root(str(tmp_path / "store"), mount_drive=True, colab=False) == tmp_path / "store"
    assert (tmp_path / "store").is_dir()
    assert notebook.storage_root("", mount_drive=True, colab=False) == ROOT


def test_pasted_recipe_is_saved_in_the_storage_folder(tmp_path):
    text = (ROOT / "recipes" / "qwen2_7b.yaml").read_text()
    session = notebook.start_session("recipes/ignored.yaml", text, tmp_path)
    assert session.recipe == tmp_path / "recipes" / "replete-qwen2-7b.yaml"
    assert session.recipe.read_text() == text
    with pytest.raises(ValueError, match="RECIPE_YAML"):
        notebook.write_pasted_recipe("- just\n- a list\n", tmp_path)


def _fake_colab_secrets(monkeypatch, value: str | None) -> None:
    """google.colab exists only in Colab: a stand-in with userdata.get and its exception types."""
    userdata = types.ModuleType("google.colab.userdata")
    for name in ("SecretNotFoundError", "NotebookAccessError", "TimeoutException"):
        setattr(userdata, name, type(name, (Exception,), {}))

    def get(key):
        if value is None:
            raise userdata.SecretNotFoundError(key)
        return value

    userdata.get = get
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)


def test_hub_token_comes_from_colab_secrets_and_is_never_shown(monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _fake_colab_secrets(monkeypatch, "hf_secret_value_123")
    message = notebook.load_hub_token(colab=True)
    assert "Colab secrets" in message and "hf_secret_value_123" not in message + capsys.readouterr().out
    assert notebook.os.environ["HF_TOKEN"] == "hf_secret_value_123"


def test_no_hub_token_is_reported_not_raised(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _fake_colab_secrets(monkeypatch, None)
    assert "none" in notebook.load_hub_token(colab=True)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    message = notebook.load_hub_token(colab=False)
    assert "environment" in message and "hf_from_env" not in message


def test_install_commands_pin_unsloth_as_pyproject_does():
    assert notebook.install_commands(colab=False) == [], "outside Colab `make setup` owns the environment"
    assert notebook.install_commands(colab=True, is_installed=lambda module: True) == []
    commands = notebook.install_commands(colab=True, is_installed=lambda module: module == "bitsandbytes")
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["unsloth"]
    assert commands[-1] == ["--no-deps", *pinned]
    assert Path(commands[0][1]).is_file(), "Unsloth's run-time requirements are installed before it"


def test_push_needs_a_repository(tmp_path):
    session = notebook.Session(Path("recipes/qwen2_7b.yaml"), tmp_path)
    with pytest.raises(ValueError, match="HUB_REPO_ID"):
        notebook.push_to_hub(session, "")


def _execute(tmp_path: Path, parameters: dict[str, object]):
    """Run the notebook as papermill does: a cell with the new values injected after the `parameters` cell."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    position = nb.cells.index(_code_cells(nb)[0]) + 1
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(position, injected)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return {cell.get("id"): cell for cell in nb.cells}


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _status(cell) -> list[dict]:
    return next(
        o.metadata[notebook.STATUS_METADATA_KEY]
        for o in cell.outputs
        if notebook.STATUS_METADATA_KEY in o.get("metadata", {})
    )


@pytest.mark.slow
def test_notebook_runs_every_stage_then_resumes_with_nothing_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    storage = tmp_path / "drive"
    parameters = {
        "RECIPE": "recipes/tiny_cpu.yaml",
        "MOUNT_DRIVE": False,
        "OUTPUT_ROOT": str(storage),
        "OVERRIDES": [
            *SMALL_RUN,
            "publish.dry_run=true",
            "export.gguf.outtypes=[q8_0]",
            "export.gguf.tokenizer_pre=qwen2",
        ],
        "CHAT_PROMPT": "sort\nc a b",
        "PUSH_TO_HUB": True,
        "HUB_REPO_ID": "someone/tiny-cpu-merged",
        "PUSH_WHAT": "both",
    }
    cells = {stage: stage for stage in STAGES} | {"publish": "push"}

    first = _execute(tmp_path, parameters)
    run = storage / "runs" / "tiny-cpu"
    assert (run / "merge" / "config.json").is_file() and list((run / "merge").glob("*.safetensors"))
    assert (run / "publish" / "README.md").is_file(), "the push cell ran the publish stage (dry run: no upload)"
    rows = _status(first["status"])
    assert {row["stage"] for row in rows} == set(STAGES) - {"publish"}, "publish is opt-in: cell 7"
    assert [row for row in rows if row["state"] != "done"] == []
    assert all(Path(row["output"]).is_relative_to(storage) for row in rows), "everything is kept in the storage"
    for stage, cell in cells.items():
        assert "skipped" not in _stdout(first[cell]) and "done" in _stdout(first[cell]), stage

    second = _execute(tmp_path, parameters)
    for stage, cell in cells.items():
        lines = _stdout(second[cell]).splitlines()
        steps = [line for line in lines if line.startswith(stage)]
        assert steps and all("skipped" in line for line in steps), f"{stage} ran again:\n" + "\n".join(lines)
    assert [row["state"] for row in _status(second["status"])] == ["done"] * len(rows)


def test_a_stage_the_recipe_does_not_enable_is_skipped_so_run_all_goes_on(tmp_path, capsys):
    session = notebook.Session(Path("recipes/qwen2_7b.yaml"), tmp_path)  # no search: block, no publish.repo_id
    notebook.run_stage(session, "search")
    assert "search: not enabled by this recipe (it runs with a search: block); skipped" in capsys.readouterr().out
    assert not any(tmp_path.iterdir()), "nothing was written"


def test_a_recipe_picked_in_the_dropdown_is_remembered_until_the_recipe_parameter_changes(tmp_path, capsys):
    default = "recipes/qwen2_5_1_5b_colab.yaml"
    assert notebook.start_session(default, "", tmp_path).recipe == Path(default)
    notebook.remember_choice(tmp_path, default, Path("recipes/qwen2_7b.yaml"))  # what the dropdown does on change
    again = notebook.start_session(default, "", tmp_path)  # Run all after a disconnect
    assert again.recipe == Path("recipes/qwen2_7b.yaml") and again.parameter == default
    assert "picked in the dropdown" in capsys.readouterr().out
    edited = notebook.start_session("recipes/qwen2_5_7b.yaml", "", tmp_path)  # the user edited RECIPE since
    assert edited.recipe == Path("recipes/qwen2_5_7b.yaml")


def test_the_default_recipe_fits_a_free_colab_runtime_and_drive():
    """The notebook's default keeps the T4 settings in the recipe itself, not in a header the notebook never reads:
    4-bit training, one row a step, no adapted model saved to Drive, a 1.5B model (3.1 GB in bf16)."""
    from pipeline.recipe import load_recipe

    recipe = load_recipe(ROOT / _parameters(nbformat.read(NOTEBOOK, as_version=4))["RECIPE"])
    assert recipe.train.load_in_4bit and recipe.train.batch_size == 1 and recipe.train.max_seq_length <= 2048
    assert not recipe.apply.save and recipe.merge.engine == "fused"
    assert "1.5B" in recipe.base_model and "1.5B-Instruct" in recipe.target_model
