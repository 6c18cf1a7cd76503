"""The evaluate stage on tiny real models: a row per model of the lineage, a column per set, report.json/md/png,
one model in memory at a time, an adapted model computed on the fly equal to apply's, lm_eval's absence reported."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from datasets import concatenate_datasets, load_from_disk
from helpers.recipes import DEMO_DATA, evaluate_recipe
from helpers.references import peft_reference
from helpers.stages import step_inputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.data import templates
from pipeline.evaluation import lm_eval_tasks
from pipeline.evaluation.lineage import Evaluation, evaluate_lineage
from pipeline.evaluation.models import ModelSpec
from pipeline.evaluation.sets import held_out_set, retention_sets
from pipeline.evaluation.transfer import transfer_report
from pipeline.recipe import LmEvalConfig, Recipe
from pipeline.stages import STAGES, Inputs, StageRef, evaluate, prepare


@pytest.fixture
def live_models(monkeypatch):
    """Wrap the real `from_pretrained` to keep a weak reference to every model it returns; on each new load,
    record how many earlier ones are still alive (not garbage collected)."""
    original = AutoModelForCausalLM.from_pretrained
    loaded, alive_at_load = [], []

    def counting(*args, **kwargs):
        alive_at_load.append(sum(reference() is not None for reference in loaded))
        model = original(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    return {"loaded": loaded, "alive_at_load": alive_at_load}


def test_stage_writes_a_row_per_model_and_a_column_per_set(lineage, live_models, capsys, monkeypatch):
    monkeypatch.setattr(lm_eval_tasks, "lm_eval_available", lambda: False)  # a machine without the lm-eval extra
    recipe, inputs = lineage["recipe"], lineage["inputs"]
    out = lineage["root"] / "evaluate.partial"
    out.mkdir()
    evaluate.check(recipe, "")
    declared = {ref: inputs.paths[ref] for ref in evaluate.depends_on(recipe, "")}
    summary = evaluate.run(recipe, "", out, step_inputs(recipe, declared))
    models = ["base", "target", "trained:reverse", "trained:sort", "adapted:reverse", "adapted:sort", "merged"]
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == summary["models"] == models
    assert [(s["name"], s["kind"], s["rows"]) for s in report["sets"]] == [
        ("reverse", "held-out", 6),
        ("sort", "held-out", 6),
        ("copy", "retention", 6),
    ]
    for model in models:
        for name in ("reverse", "sort", "copy"):
            result = report["results"][model][name]
            assert result["tokens"] > 0 and result["loss"] > 0 and result["samples"] == 6
            assert 0 <= result["exact_match"] <= result["contains"] <= 1
    losses = {m: report["results"][m]["reverse"]["loss"] for m in models}
    assert len(set(losses.values())) == len(models), f"every model scores differently: {losses}"
    table = (out / "report.md").read_text()
    lines = table.splitlines()
    loss_table = lines.index("| model | reverse (held-out) | sort (held-out) | copy (retention) |")
    assert [line.split("|")[1].strip() for line in lines[loss_table + 2 : loss_table + 2 + len(models)]] == models
    assert lines[2].startswith("What did the merge learn?")  # the report leads with learned and kept
    assert f"hellaswag: {lm_eval_tasks.NOT_INSTALLED}" in table
    assert report["lm_eval"] == {"tasks": ["hellaswag"], "status": lm_eval_tasks.NOT_INSTALLED}
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | reverse (held-out) | sort (held-out) | copy (retention) |" in capsys.readouterr().out
    assert report["transfer"] == transfer_report(report["results"], ["reverse", "sort"], generated=True)
    assert set(report["transfer"]) == {"reverse", "sort"}, "each adapter on its own held-out set"
    assert "Does each LoRA work on the target as on the base?" in table
    assert len(live_models["loaded"]) == len(models)
    assert live_models["alive_at_load"] == [0] * len(models), "a model was still in memory when the next loaded"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_adapted_model_on_the_fly_equals_the_saved_one(lineage, tiny_models, dtype):
    recipe, inputs = lineage["recipe"], lineage["inputs"]
    unsaved = recipe.model_copy(update={"apply": recipe.apply.model_copy(update={"save": False})})
    on_the_fly = next(s for s in evaluate.lineage(unsaved, inputs) if s.label == "adapted:sort")
    assert on_the_fly.adapter == inputs.path("archive", "sort") and on_the_fly.path == Path(tiny_models["target"])
    saved_dir = inputs.path("apply", "sort")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["base"])
    settings = recipe.evaluate.model_copy(update={"generate": False, "dtype": dtype, "lm_eval": LmEvalConfig()})
    evaluation = Evaluation(
        config=settings,
        device=torch.device("cpu"),
        tokenizer=tokenizer,
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
    )
    sets = [held_out_set("sort", inputs.path("prepare", "sort"), None)]
    results, _ = evaluate_lineage([on_the_fly, ModelSpec("saved", "adapted", saved_dir)], sets, evaluation)
    assert results["adapted:sort"]["sort"]["loss"] == results["saved"]["sort"]["loss"]


def test_a_trained_model_is_the_base_with_its_lora_merged_by_peft(lineage, tiny_models, tmp_path):
    recipe, inputs = lineage["recipe"], lineage["inputs"]
    trained = next(s for s in evaluate.lineage(recipe, inputs) if s.label == "trained:sort")
    assert trained.path == Path(tiny_models["base"]).resolve() and trained.adapter == inputs.path("archive", "sort")
    by_hand = peft_reference(tiny_models["base"], inputs.path("archive", "sort"), tmp_path / "by-hand")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["base"])
    settings = recipe.evaluate.model_copy(update={"generate": False, "dtype": "float32", "lm_eval": LmEvalConfig()})
    evaluation = Evaluation(settings, torch.device("cpu"), tokenizer, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    sets = [held_out_set("sort", inputs.path("prepare", "sort"), None)]
    results, _ = evaluate_lineage([trained, ModelSpec("by hand", "trained", by_hand)], sets, evaluation)
    assert results["trained:sort"]["sort"]["loss"] == results["by hand"]["sort"]["loss"]
    base, _ = evaluate_lineage([ModelSpec("base", "base", tiny_models["base"])], sets, evaluation)
    assert results["trained:sort"]["sort"]["loss"] != base["base"]["sort"]["loss"], "the LoRA changes the base"


def test_stage_contract(lineage):
    recipe = lineage["recipe"]
    assert list(STAGES)[list(STAGES).index("merge") + 1] == "evaluate"
    assert evaluate.items(recipe) == [""]
    assert (
        evaluate.items(recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"enabled": False})}))
        == []
    )
    assert evaluate.STAGE.output_path(recipe, "") == Path(recipe.output_dir) / "evaluate"
    assert [ref.label for ref in evaluate.depends_on(recipe, "")] == [
        "merge",
        "prepare.reverse",
        "prepare.sort",
        "apply.reverse",
        "apply.sort",
        "archive.reverse",  # each LoRA on the base (trained) reads the archived adapter
        "archive.sort",
    ]
    unsaved = recipe.model_copy(update={"apply": recipe.apply.model_copy(update={"save": False})})
    assert evaluate.depends_on(unsaved, "")[-2:] == [StageRef("archive", "reverse"), StageRef("archive", "sort")]
    untrained = {"models": ["base", "target", "adapted", "merged"]}
    saved_only = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update=untrained)})
    unsaved_only = unsaved.model_copy(update={"evaluate": unsaved.evaluate.model_copy(update=untrained)})
    assert evaluate.config(saved_only, "") != evaluate.config(unsaved_only, ""), "on the fly: apply.dtype counts"
    other_dtype = recipe.model_copy(update={"apply": recipe.apply.model_copy(update={"dtype": "float32"})})
    assert evaluate.config(other_dtype, "") != evaluate.config(recipe, ""), "base + LoRA is computed on the fly"
    # The adapted models are apply's outputs; the archived adapters stay inputs: their files are the identity of
    # every model computed from them, the merge's included.
    assert [ref.label for ref in evaluate.depends_on(saved_only, "")][-4:] == [
        "apply.reverse",
        "apply.sort",
        "archive.reverse",
        "archive.sort",
    ]
    only_models = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"models": ["target"]})})
    assert evaluate.depends_on(only_models, "") == [StageRef("prepare", "reverse"), StageRef("prepare", "sort")]


def test_retention_data_under_home_is_fingerprinted_by_content(tiny_models, finetune_sets, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "copy.messages.jsonl"
    data.write_bytes((DEMO_DATA / "copy.messages.jsonl").read_bytes())
    recipe = evaluate_recipe(
        tiny_models,
        finetune_sets,
        tmp_path,
        retention=[{"name": "copy", "dataset": {"path": "~/copy.messages.jsonl", "format": "messages"}}],
    )
    before = evaluate.config(recipe, "")
    data.write_text(data.read_text().replace("a", "b"))
    assert evaluate.config(recipe, "") != before


def test_retention_rows_are_rendered_exactly_as_prepare_renders_a_finetune(tiny_models, finetune_sets, tmp_path):
    copy = {"path": str(DEMO_DATA / "copy.messages.jsonl"), "format": "messages"}
    settings = evaluate_recipe(tiny_models, finetune_sets, tmp_path, max_samples=None).model_dump(mode="json")
    recipe = Recipe.model_validate({**settings, "finetunes": [{"name": "copy", "dataset": {**copy, "eval_size": 10}}]})
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    prepare.run(recipe, "copy", prepared, Inputs())
    rows = concatenate_datasets([load_from_disk(str(prepared / split)) for split in ("train", "eval")])
    chat = templates.chat_format(recipe.chat_template, recipe.base_model, recipe.target_model)
    [ours] = retention_sets(
        recipe.evaluate.retention, chat, tmp_path / "work", max_length=recipe.train.max_seq_length, max_samples=None
    )
    expected = {(tuple(r["input_ids"]), tuple(r["assistant_masks"])) for r in rows}
    assert {(tuple(i), tuple(m)) for i, m in zip(ours.input_ids, ours.assistant_masks, strict=True)} == expected
    lines = (DEMO_DATA / "copy.messages.jsonl").read_text().splitlines()
    # every row of the file is kept (prepare drops duplicates from a fine-tune's data; a retention set keeps them)
    assert len(ours.input_ids) == len(lines) and ours.references[0] == json.loads(lines[0])["messages"][-1]["content"]
