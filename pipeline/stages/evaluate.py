"""evaluate: base, target, each adapted model and the merged model, scored on every fine-tune's held-out split
(what the merge learned) and on the retention sets (what it kept); report.json, report.md and report.png."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.archive.store import adapter_dir, read_manifest, selected_adapters
from pipeline.data import templates
from pipeline.data.loading import check_dataset_path
from pipeline.fingerprint import content_fingerprint, model_fingerprint, sha256_file
from pipeline.models.hub import check_model_reference
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import apply

NAME = "evaluate"
RESUMABLE = False
WRITE_ONCE = False


def items(recipe: Recipe) -> list[str]:
    return [""] if recipe.evaluate.enabled else []


def output_path(recipe: Recipe, item: str) -> Path:
    return Path(recipe.output_dir) / "evaluate"


def _adapters(recipe: Recipe) -> list[str]:
    return selected_adapters(recipe) if "adapted" in recipe.evaluate.models else []


def _fingerprint_of(reference: str) -> str:
    """Content of a local file or directory (`~` expanded, as the dataset is read); a Hub id stands for itself."""
    local = Path(reference).expanduser()
    return content_fingerprint(local) if local.exists() else reference


def config(recipe: Recipe, item: str) -> dict:
    """The evaluate block, the models' identities, and what the retention sets are rendered from (their content,
    the chat template, the base tokenizer, max_seq_length), as prepare fingerprints a fine-tune's data."""
    template = templates.template_file(recipe.chat_template)
    settings = {"evaluate": recipe.evaluate.model_dump(), "base": model_fingerprint(recipe.base_model),
                "target": model_fingerprint(recipe.target_model), "trust_remote_code": recipe.trust_remote_code,
                "adapters": _adapters(recipe)}
    if recipe.evaluate.retention:
        settings["retention"] = {
            "data": {r.name: _fingerprint_of(r.dataset.path) for r in recipe.evaluate.retention},
            "chat_template": recipe.chat_template,
            "template_identity": sha256_file(template) if template else templates.tokenizer_fingerprint(
                recipe.target_model),
            "base_tokenizer": templates.tokenizer_fingerprint(recipe.base_model),
            "max_seq_length": recipe.train.max_seq_length}
    saved = set(apply.items(recipe))
    if any(name not in saved for name in settings["adapters"]):
        settings["apply_dtype"] = recipe.apply.dtype
    foreign = {name: read_manifest(adapter_dir(recipe, name))["files"] for name in settings["adapters"]
               if not apply.is_own_finetune(recipe, name)}
    if foreign:
        settings["adapter_files"] = foreign
    return settings


def depends_on(recipe: Recipe, item: str) -> list[tuple[str, str]]:
    dependencies = [("merge", "")] if "merged" in recipe.evaluate.models else []
    dependencies += [("prepare", finetune.name) for finetune in recipe.finetunes]
    saved = set(apply.items(recipe))
    for name in _adapters(recipe):
        if name in saved:
            dependencies.append(("apply", name))
        elif apply.is_own_finetune(recipe, name):
            dependencies.append(("archive", name))
    return dependencies


def check(recipe: Recipe, item: str) -> None:
    """Set names are unique across fine-tunes and retention sets, retention datasets exist, models are reachable."""
    names = [f.name for f in recipe.finetunes] + [r.name for r in recipe.evaluate.retention]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RecipeError(f"evaluate.retention: names {repeated} repeat a fine-tune's or another retention set's; "
                          "each set is a column of the report and needs its own name")
    for index, retention in enumerate(recipe.evaluate.retention):
        check_dataset_path(retention.dataset, f"evaluate.retention.{index}.dataset")
    check_model_reference(recipe.base_model, "base_model")
    check_model_reference(recipe.target_model, "target_model")


def run(recipe: Recipe, item: str, out: Path, inputs: dict) -> dict:
    from pipeline.evaluation.evaluate import evaluate_recipe
    from pipeline.evaluation.report import write_report

    work_dir = Path(out) / "_work"
    report = evaluate_recipe(recipe, inputs, work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    table = write_report(report, out)
    print(f"\n{table}")
    return {"models": report["models"], "sets": [s["name"] for s in report["sets"]],
            "loss": {model: {name: round(r["loss"], 4) if r["loss"] is not None else None
                             for name, r in per_set.items()} for model, per_set in report["results"].items()},
            "report": str(output_path(recipe, item) / "report.md")}
