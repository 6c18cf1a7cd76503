"""What colab/finetune_then_merge.ipynb does besides running stages: as plain, tested functions, so the notebook
holds no logic of its own and a Colab session runs exactly the CLI's code path (`pipeline.run.run_recipe`).

The notebook keeps every run and adapter in one storage folder (Google Drive in Colab), so a new session resumes
where a disconnected one stopped: the runner skips finished steps and training resumes from its last checkpoint.
The pipeline is imported inside the functions, so the first cells (install, storage, token) run before any of it
is loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

DRIVE_MOUNT_POINT = Path("/content/drive")
DRIVE_DEFAULT_FOLDER = "ftmerge"
STATUS_METADATA_KEY = "ftmerge/status"
HUB_TOKEN_NAME = "HF_TOKEN"
# In the storage folder: the recipe last picked in the dropdown, and the RECIPE parameter it was picked against.
CHOICE_FILE = ".ftmerge-notebook.json"


class NotebookStageFailed(RuntimeError):
    """A stage cell failed; raised so that "Run all" stops at that cell. The lines above it name the cause."""


def in_colab() -> bool:
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules


def project_root() -> Path:
    """The checkout holding recipes/ and data_templates/: recipes name their data relative to it."""
    return Path(__file__).resolve().parents[1]


def _extra_requirements(extra: str) -> list[str]:
    """This project's pinned requirements of one extra (pyproject.toml), e.g. unsloth==2026.10.9."""
    marker = f'extra == "{extra}"'
    return [r.split(";")[0].strip() for r in importlib.metadata.requires("ftmerge") or [] if marker in r]


def install_commands(
    colab: bool, is_installed=lambda module: importlib.util.find_spec(module) is not None
) -> list[list[str]]:
    """pip arguments for what a Colab runtime lacks: Unsloth pinned as in pyproject's `unsloth` extra, installed
    with --no-deps after its run-time requirements so Colab's CUDA torch and torchvision stay untouched, and
    bitsandbytes for 4-bit training. Outside Colab nothing is installed here (`make setup` owns the venv)."""
    if not colab:
        return []
    commands = []
    if not is_installed("bitsandbytes"):
        commands.append(["bitsandbytes"])
    if not (is_installed("unsloth") and is_installed("unsloth_zoo")):
        commands.append(["-r", str(project_root() / "requirements" / "unsloth-deps.txt")])
        commands.append(["--no-deps", *_extra_requirements("unsloth")])
    return commands


def install_missing(colab: bool | None = None) -> None:
    """Install what `install_commands` lists into the running interpreter; says when nothing was needed."""
    colab = in_colab() if colab is None else colab
    commands = install_commands(colab)
    for arguments in commands:
        print("pip install", " ".join(arguments))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *arguments], check=True)
    if not commands:
        missing = [m for m in ("unsloth", "trl", "peft", "mergekit") if importlib.util.find_spec(m) is None]
        print(
            "nothing to install"
            + (
                f"; missing {missing}: run `make setup` in {project_root()}"
                if missing
                else ": every requirement is importable"
            )
        )


def storage_root(output_root: str = "", *, mount_drive: bool = True, colab: bool | None = None) -> Path:
    """The folder that holds runs and adapters. In Colab with `mount_drive`: Google Drive is mounted and the folder
    is `My Drive/<output_root or ftmerge>`, which outlives the session. Otherwise `output_root`, or the project
    folder itself (the CLI's own runs/), when empty."""
    colab = in_colab() if colab is None else colab
    if colab and mount_drive:
        from google.colab import drive

        drive.mount(str(DRIVE_MOUNT_POINT))
        root = DRIVE_MOUNT_POINT / "MyDrive" / (output_root or DRIVE_DEFAULT_FOLDER)
    else:
        root = Path(output_root) if output_root else project_root()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def load_hub_token(colab: bool | None = None) -> str:
    """Put a Hub token into this process's environment (HF_TOKEN, read by huggingface_hub) from Colab's secrets or
    the environment. The token is never printed, returned or written to disk; returns where it came from."""
    colab = in_colab() if colab is None else colab
    if colab:
        from google.colab import userdata

        try:
            token = userdata.get(HUB_TOKEN_NAME)
        except (userdata.SecretNotFoundError, userdata.NotebookAccessError, userdata.TimeoutException):
            token = None
        if token:
            os.environ[HUB_TOKEN_NAME] = token
            return f"Hub token: from Colab secrets ({HUB_TOKEN_NAME})"
    if os.environ.get(HUB_TOKEN_NAME):
        return f"Hub token: from the environment ({HUB_TOKEN_NAME})"
    return (
        f"Hub token: none; public models only. Add a secret named {HUB_TOKEN_NAME} (Colab: key icon on the "
        "left) for gated models or to push to the Hub."
    )


@dataclass
class Session:
    """The recipe the notebook runs, the user's `--set` overrides, the storage folder, and the RECIPE parameter the
    notebook was started with (a dropdown choice is remembered against it)."""

    recipe: Path
    storage: Path
    overrides: list[str] = field(default_factory=list)
    parameter: str = ""

    def settings(self) -> list[str]:
        """The user's overrides, then the storage ones (later `--set`s win)."""
        return [*self.overrides, *storage_overrides(self.recipe, self.storage, self.overrides)]

    def load(self) -> Recipe:
        """The recipe as the stage cells run it."""
        from pipeline.recipe import load_recipe

        return load_recipe(self.recipe, self.settings())


def storage_overrides(recipe_path: Path, storage: Path, overrides: list[str] = ()) -> list[str]:
    """`output_dir` and `archive_dir` moved under the storage folder when the recipe gives them as relative paths
    (runs/x becomes <storage>/runs/x); absolute ones are kept."""
    from pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    moved = []
    for key in ("output_dir", "archive_dir"):
        path = Path(getattr(recipe, key))
        if not path.is_absolute():
            moved.append(f"{key}={json.dumps(str(storage / path))}")
    return moved


def list_recipes() -> list[Path]:
    return sorted((project_root() / "recipes").glob("*.yaml"))


def write_pasted_recipe(text: str, storage: Path) -> Path:
    """Save a recipe pasted into the notebook as `<storage>/recipes/<name>.yaml`, so a new session finds it."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError("RECIPE_YAML: expected a YAML mapping with a `name:` key, as in recipes/*.yaml")
    path = storage / "recipes" / f"{Path(data['name']).name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def start_session(recipe: str, recipe_yaml: str, storage: Path, overrides: list[str] = ()) -> Session:
    """The session for a recipe path (relative to the project) or, when given, the pasted YAML instead. A recipe
    picked in the dropdown wins over the RECIPE parameter it was picked against, so *Run all* after a disconnect
    goes on with the same run; editing RECIPE makes it the choice again."""
    if recipe_yaml.strip():
        return Session(write_pasted_recipe(recipe_yaml, storage), storage, list(overrides))
    picked = remembered_choice(storage, recipe)
    if picked is not None:
        print(f"recipe: {picked} (picked in the dropdown, remembered in {storage / CHOICE_FILE})")
    return Session(picked or Path(recipe), storage, list(overrides), parameter=recipe)


def remember_choice(storage: Path, parameter: str, recipe: Path) -> None:
    (Path(storage) / CHOICE_FILE).write_text(json.dumps({"parameter": parameter, "recipe": str(recipe)}))


def remembered_choice(storage: Path, parameter: str) -> Path | None:
    """The recipe picked in the dropdown while RECIPE was `parameter`, when it still exists."""
    try:
        choice = json.loads((Path(storage) / CHOICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    recipe = Path(choice.get("recipe", ""))
    if choice.get("parameter") != parameter or (not (project_root() / recipe).is_file() and not recipe.is_file()):
        return None
    return recipe


def build_demo_models_if_needed(session: Session) -> None:
    """The offline demo recipe reads tiny models that are built locally (once, cached); build them when the chosen
    recipe points at them."""
    from pipeline import console
    from pipeline.demo import DEMO_MODELS
    from pipeline.demo.lineage import build_demo_assets

    recipe = session.load()
    demo = (project_root() / DEMO_MODELS).resolve()
    if {Path(recipe.base_model).resolve(), Path(recipe.target_model).resolve()} & {demo / "base", demo / "target"}:
        with console.run_console(demo.parent, command="demo models"), console.progress("demo models (built once)"):
            built = build_demo_assets(demo)
        print(f"demo models: {built['target'].parent}")


def _run(session: Session, **options) -> int:
    """`pipeline.run.run_recipe` on the session's recipe, with the CLI's messages and exit codes."""
    from pipeline.recipe import RecipeError
    from pipeline.run import run_recipe

    try:
        recipe = session.load()
    except (RecipeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_recipe(recipe, **options)


def dry_run(session: Session) -> int:
    """Validate the recipe and print the plan (`--dry-run`); loads no model."""
    build_demo_models_if_needed(session)
    return _run(session, dry_run=True)


def choose_recipe(session: Session) -> None:
    """A dropdown over recipes/ (when ipywidgets is available, as in Colab) that re-plans on change; the stage
    cells run whatever it shows. Without ipywidgets: the plan of the session's recipe."""
    if importlib.util.find_spec("ipywidgets") is None:
        dry_run(session)
        return
    import ipywidgets
    from IPython.display import display

    options = sorted({str(p.relative_to(project_root())) for p in list_recipes()} | {str(session.recipe)})
    dropdown = ipywidgets.Dropdown(options=options, value=str(session.recipe), description="recipe")
    plan = ipywidgets.Output()

    def show_plan(change=None) -> None:
        session.recipe = Path(dropdown.value)
        if change is not None:
            remember_choice(session.storage, session.parameter, session.recipe)
        plan.clear_output()
        with plan:
            dry_run(session)

    dropdown.observe(show_plan, names="value")
    display(ipywidgets.VBox([dropdown, plan]))
    show_plan()


def run_stage(session: Session, stage: str) -> None:
    """One stage through the CLI's code path; finished steps are skipped, a stage the recipe does not enable too
    (*Run all* goes on). Raises when it fails."""
    from pipeline.stages import ENABLED_BY, STAGES

    if not STAGES[stage].items(session.load()):
        print(f"{stage}: not enabled by this recipe (it runs with {ENABLED_BY[stage]}); skipped")
        return
    code = _run(session, stages=[stage])
    if code != 0:
        raise NotebookStageFailed(
            f"stage {stage} exited with code {code} (2: bad recipe or inputs not done, "
            "1: failed while running); the message above names the cause"
        )


def status_rows(session: Session) -> list[dict]:
    """Every step as data: stage, item, state (done, stale, pending, failed, interrupted, running, missing),
    fingerprint, seconds, output: the rows of `--status`."""
    from pipeline import runner

    recipe = session.load()
    return runner.status_rows(recipe, runner.plan(recipe))


def show_status(session: Session) -> None:
    """The `--status` table, then a one-line summary that carries the rows as output metadata, so a headless run
    (papermill, nbclient) can read the state of every step from the executed notebook."""
    from pipeline import runner
    from pipeline.run import print_table

    recipe = session.load()
    steps = runner.plan(recipe)
    print_table(recipe, steps)
    rows = runner.status_rows(recipe, steps)
    done = sum(row["state"] == "done" for row in rows)
    summary = f"{done} of {len(rows)} steps done"
    try:
        from IPython.display import display
    except ImportError:
        print(summary)
        return
    display({"text/plain": summary}, raw=True, metadata={STATUS_METADATA_KEY: rows})


def merged_model_dir(recipe: Recipe) -> Path:
    from pipeline.stages import STAGES

    return STAGES["merge"].output_path(recipe, "")


def chat(session: Session, prompt: str, max_new_tokens: int = 48) -> str:
    """One greedy reply of the merged model (`pipeline.evaluation.generate.chat_reply`)."""
    from pipeline import console
    from pipeline.evaluation.generate import chat_reply

    recipe = session.load()
    model_dir = merged_model_dir(recipe)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no merged model in {model_dir}: run the merge cell first")
    with console.run_console(recipe.output_dir, command="chat"):  # the model's loading messages go to the log
        return chat_reply(model_dir, prompt, max_new_tokens=max_new_tokens, trust_remote_code=recipe.trust_remote_code)


def push_to_hub(session: Session, repo_id: str = "", what: str = "merged", private: bool = True) -> None:
    """The publish stage (model card + one upload with huggingface_hub) for the merged model, the adapters or both;
    `repo_id` overrides the recipe's `publish.repo_id`. The token is huggingface_hub's (HF_TOKEN from cell 3)."""
    settings = [f"publish.what={what}", f"publish.private={str(private).lower()}"]
    if repo_id:
        settings.append(f"publish.repo_id={json.dumps(repo_id)}")
    publishing = Session(session.recipe, session.storage, [*session.overrides, *settings], session.parameter)
    if not publishing.load().publish.repo_id:
        raise ValueError("HUB_REPO_ID: give the Hub repository to push to, e.g. 'your-name/qwen2-7b-merged'")
    run_stage(publishing, "publish")
