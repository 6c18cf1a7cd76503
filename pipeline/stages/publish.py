"""publish (opt-in with `publish.repo_id`): the merged model and/or the adapters, with a model card, to the Hub.

The folder is assembled in `<output_dir>/publish/` exactly as the repo will hold it, then uploaded in one commit;
with `publish.dry_run` it is only assembled. The token comes from HF_TOKEN or the cached login and is never
printed, logged or written: it goes from huggingface_hub's lookup straight into the HfApi client.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import console
from pipeline.archive.store import verify_adapter
from pipeline.recipe import Recipe, RecipeError, result_settings
from pipeline.stages.contract import Inputs, Stage, StageRef
from pipeline.stages.selection import adapter_set


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.publish.repo_id else []


def config(recipe: Recipe, item: str) -> dict:
    return {"publish": result_settings(recipe.publish), "target_model": recipe.target_model}


def depends_on(recipe: Recipe, item: str) -> list[StageRef]:
    dependencies = [StageRef("merge")] + ([StageRef("evaluate")] if recipe.evaluate.enabled else [])
    if recipe.export.gguf is not None and recipe.publish.what != "adapters":
        dependencies.append(StageRef("export"))  # the GGUF files go beside the merged model's safetensors
    adapters = adapter_set(recipe)
    return dependencies + adapters.archive_steps(adapters.names)  # the merged adapters' manifests, and their files


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
    from pipeline.publishing.folder import published_files
    from pipeline.publishing.upload import hub_token, upload_folder

    what = recipe.publish.what
    token = None if recipe.publish.dry_run else hub_token()
    _write_folder(recipe, inputs, out, token)
    summary = {
        "repo_id": recipe.publish.repo_id,
        "what": what,
        "files": published_files(out),
        "folder": str(STAGE.output_path(recipe, item)),
    }
    if recipe.publish.dry_run:
        console.notice(f"publish: dry run, nothing uploaded; the folder that would be: {summary['folder']}")
        return {**summary, "dry_run": True}
    result = upload_folder(
        out,
        recipe.publish.repo_id,
        private=recipe.publish.private,
        token=token,
        commit_message=f"ftmerge: {recipe.name} ({what})",
    )
    console.notice(f"publish: uploaded {len(summary['files'])} files to {result['repo_url']}")
    return {**summary, **result, "dry_run": False}


def _write_folder(recipe: Recipe, inputs: Inputs, out: Path, token: str | None) -> None:
    """What is uploaded: the merged model and/or its adapters, the GGUF files, the evaluation chart, and the card
    (`token` reads the target's license from the Hub)."""
    from pipeline.evaluation.report import REPORT_PNG, read_lm_eval, read_report_tables, read_transfer
    from pipeline.llama_cpp.verify import read_verification
    from pipeline.merging.output import merge_config_text, read_lineage
    from pipeline.publishing.card import Release, find_license, model_card
    from pipeline.publishing.folder import CARD, EVALUATION_CHART, assemble_folder

    merged = inputs.path("merge")
    lineage = read_lineage(merged)
    names = [adapter["name"] for adapter in lineage["adapters"]]
    archived = {name: inputs.adapter_dir(name) for name in names}
    manifests = {name: verify_adapter(path) for name, path in archived.items()}
    what = recipe.publish.what
    # Only an evaluation of this very merge (a dependency, so never stale) goes into the card.
    evaluate_dir = inputs.get("evaluate")
    export_dir = inputs.get("export")
    gguf_files = sorted(export_dir.glob("*.gguf")) if export_dir else []
    assemble_folder(
        out,
        merged if what != "adapters" else None,
        archived if what != "merged" else {},
        evaluate_dir / REPORT_PNG if evaluate_dir else None,
        gguf_files,
    )
    evaluation = read_report_tables(evaluate_dir) if evaluate_dir else None
    if evaluation and (out / EVALUATION_CHART).is_file():
        evaluation += f"\n\n![evaluation chart]({EVALUATION_CHART})\n"
    release = Release(recipe.publish.repo_id, what, recipe.name, recipe.base_model, recipe.target_model)
    (out / CARD).write_text(
        model_card(
            release,
            lineage,
            merge_config_text(merged),
            manifests,
            evaluation,
            find_license(lineage.get("target_path"), recipe.target_model, token),
            gguf_files={file.name: file.stat().st_size for file in gguf_files},
            lm_eval=read_lm_eval(evaluate_dir) if evaluate_dir else None,
            gguf_verification=read_verification(export_dir) if export_dir else None,
            transfer=read_transfer(evaluate_dir) if evaluate_dir else None,
        )
    )


STAGE = Stage(name="publish", items=items, config=config, depends_on=depends_on, check=check, run=run)
