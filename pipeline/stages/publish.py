"""publish (opt-in with `publish.repo_id`): the merged model and/or the adapters, with a model card, to the Hub.

The folder is assembled in `<output_dir>/publish/` exactly as the repo will hold it, then uploaded in one commit;
with `publish.dry_run` it is only assembled. The token comes from HF_TOKEN or the cached login and is never
printed, logged or written: it goes from huggingface_hub's lookup straight into the HfApi client.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.archive.store import verify_adapter
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages.contract import Inputs, Stage, StageRef
from pipeline.stages.selection import adapter_dir


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.publish.repo_id else []


def config(recipe: Recipe, item: str) -> dict:
    return {"publish": recipe.publish.model_dump(), "target_model": recipe.target_model}


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    dependencies = [StageRef("merge")] + ([StageRef("evaluate")] if recipe.evaluate.enabled else [])
    if recipe.export.gguf is not None and recipe.publish.what != "adapters":
        dependencies.append(StageRef("export"))  # the GGUF files go beside the merged model's safetensors
    return dependencies


def check(recipe: Recipe, item: str) -> None:
    """A valid repo id; unless dry_run, the Hub reachable and a token present, before any stage does work."""
    from huggingface_hub.utils import validate_repo_id

    from pipeline.publishing.upload import hub_offline, hub_token

    try:
        validate_repo_id(recipe.publish.repo_id)
    except ValueError as error:
        raise RecipeError(f"publish.repo_id: {error}") from None
    if recipe.publish.dry_run:
        return
    if hub_offline():
        raise RecipeError(
            "publish: HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset it, or set "
            "publish.dry_run: true to only write the folder and card under <output_dir>/publish/."
        )
    if not hub_token():
        raise RecipeError(
            "publish: no Hugging Face token. Set HF_TOKEN or run `hf auth login` (a token with write "
            "access), or set publish.dry_run: true to only write the folder and card."
        )


def run(recipe: Recipe, item: str, out: Path, inputs: Inputs) -> dict:
    from pipeline.llama_cpp.verify import read_verification
    from pipeline.publishing.card import find_license, model_card
    from pipeline.publishing.folder import CARD, EVALUATION_CHART, assemble_folder, published_files
    from pipeline.publishing.upload import hub_token, upload_folder

    merged = inputs.path("merge")
    lineage = json.loads((merged / "lineage.json").read_text())
    names = [adapter["name"] for adapter in lineage["adapters"]]
    manifests = {name: verify_adapter(adapter_dir(recipe, name)) for name in names}
    what = recipe.publish.what
    # Only an evaluation of this very merge (a dependency, so never stale) goes into the card.
    evaluate_dir = inputs.get("evaluate")
    export_dir = inputs.get("export")
    gguf_files = sorted(export_dir.glob("*.gguf")) if export_dir else []
    assemble_folder(
        out,
        merged if what != "adapters" else None,
        {name: adapter_dir(recipe, name) for name in names} if what != "merged" else {},
        evaluate_dir / "report.png" if evaluate_dir else None,
        gguf_files,
    )
    token = None if recipe.publish.dry_run else hub_token()
    report = evaluate_dir / "report.md" if evaluate_dir else None
    evaluation = report.read_text().split("\n", 1)[-1] if report and report.is_file() else None  # without title
    if evaluation and (out / EVALUATION_CHART).is_file():
        evaluation += f"\n![evaluation chart]({EVALUATION_CHART})\n"
    (out / CARD).write_text(
        model_card(
            recipe,
            lineage,
            (merged / "mergekit_config.yml").read_text(),
            manifests,
            evaluation,
            find_license(lineage.get("target_path"), recipe.target_model, token),
            gguf_files={file.name: file.stat().st_size for file in gguf_files},
            lm_eval=_lm_eval_scores(evaluate_dir),
            gguf_verification=read_verification(export_dir) if export_dir else None,
        )
    )
    summary = {
        "repo_id": recipe.publish.repo_id,
        "what": what,
        "files": published_files(out),
        "folder": str(STAGE.output_path(recipe, item)),
    }
    if recipe.publish.dry_run:
        print(f"publish: dry run, nothing uploaded; the folder that would be: {summary['folder']}")
        return {**summary, "dry_run": True}
    result = upload_folder(
        out,
        recipe.publish.repo_id,
        private=recipe.publish.private,
        token=token,
        commit_message=f"ftmerge: {recipe.name} ({what})",
    )
    print(f"publish: uploaded {len(summary['files'])} files to {result['repo_url']}")
    return {**summary, **result, "dry_run": False}


def _lm_eval_scores(evaluate_dir: Path | None) -> dict | None:
    """report.json's lm-eval section, for the card's model-index (None without an evaluation)."""
    report = evaluate_dir / "report.json" if evaluate_dir else None
    return json.loads(report.read_text()).get("lm_eval") if report and report.is_file() else None


STAGE = Stage(name="publish", items=items, config=config, depends_on=depends_on, check=check, run=run)
