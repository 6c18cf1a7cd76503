"""The prepare stage end to end on the shipped example files: what the train stage will read."""

import json
import shutil

import pandas as pd
import pytest
from datasets import load_from_disk
from helpers.prepared import EXAMPLES
from helpers.recipes import prepare_recipe
from helpers.stages import run_prepare
from transformers import AutoTokenizer

from pipeline.data.templates import TEMPLATES_DIR
from pipeline.fingerprint import hash_json
from pipeline.recipe import RecipeError
from pipeline.stages import prepare


def trained_text(tokenizer, row):
    return tokenizer.decode([i for i, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m])


@pytest.mark.parametrize("data_format", list(EXAMPLES))
@pytest.mark.parametrize("chat_template", ["target", "chatml"])
def test_each_format_end_to_end(tiny_models, tmp_path, data_format, chat_template):
    recipe = prepare_recipe(
        tiny_models,
        tmp_path,
        {"path": str(EXAMPLES[data_format]), "format": data_format, "eval_size": 1},
        chat_template=chat_template,
    )
    out, summary = run_prepare(recipe, tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert summary["rejected"] == 0 and summary["kept"] == summary["rows_in"] >= 5
    assert (summary["train_rows"], summary["eval_rows"]) == (summary["kept"] - 1, 1)
    assert report["end_of_turn_token"] == "<|im_end|>" and report["token_length"]["max"] > 0
    assert (out / "template.jinja").read_text() == (
        (TEMPLATES_DIR / "chatml.jinja").read_text()
        if chat_template == "chatml"
        else AutoTokenizer.from_pretrained(tiny_models["target"]).chat_template
    )
    base = AutoTokenizer.from_pretrained(tiny_models["base"])
    rows = list(load_from_disk(out / "train")) + list(load_from_disk(out / "eval"))
    for row in rows:
        assert len(row["input_ids"]) == len(row["assistant_masks"]) > 0
        assert row["input_ids"] == base(row["text"], add_special_tokens=False)["input_ids"]
        if data_format == "text":
            assert "messages" not in row and set(row["assistant_masks"]) == {1}
        else:
            replies = "".join(m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant")
            assert trained_text(base, row) == replies
            assert row["text"].count("<|im_end|>") == len(row["messages"]) + (row["messages"][0]["role"] != "system")


def test_alpaca_fields_columns_and_system_prompt(tiny_models, tmp_path):
    source = tmp_path / "renamed.jsonl"
    source.write_text(
        json.dumps({"prompt": "Add.", "extra": "2 + 3", "answer": "5"})
        + "\n"
        + json.dumps({"prompt": "Say hi.", "extra": "", "answer": "hi"})
        + "\n"
    )
    recipe = prepare_recipe(
        tiny_models,
        tmp_path,
        {
            "path": str(source),
            "format": "alpaca",
            "eval_size": 0,
            "system_prompt": "You add numbers.",
            "columns": {"instruction": "prompt", "input": "extra", "output": "answer"},
        },
    )
    out, _ = run_prepare(recipe, tmp_path)
    rows = list(load_from_disk(out / "train"))
    assert rows[0]["messages"] == [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "Add.\n2 + 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert rows[1]["messages"][1] == {"role": "user", "content": "Say hi."}
    assert len(load_from_disk(out / "eval")) == 0


def test_parquet_and_directory_sources(tiny_models, tmp_path):
    rows = [json.loads(line) for line in EXAMPLES["messages"].read_text().splitlines()]
    folder = tmp_path / "shards"
    folder.mkdir()
    pd.DataFrame(rows[:3]).to_parquet(folder / "part-0.parquet")
    pd.DataFrame(rows[3:]).to_parquet(folder / "part-1.parquet")
    _out, summary = run_prepare(
        prepare_recipe(tiny_models, tmp_path, {"path": str(folder), "format": "messages", "eval_size": 0}), tmp_path
    )
    assert summary["kept"] == len(rows)
    (folder / "notes.csv").write_text("text\nx\n")
    with pytest.raises(RecipeError, match="mixes file types"):
        prepare.check(prepare_recipe(tiny_models, tmp_path, {"path": str(folder), "format": "messages"}), "ft")


def test_train_on_everything_when_not_responses_only(tiny_models, tmp_path):
    recipe = prepare_recipe(
        tiny_models,
        tmp_path,
        {"path": str(EXAMPLES["sharegpt"]), "format": "sharegpt", "eval_size": 0},
        train={"train_on_responses_only": False},
    )
    out, _ = run_prepare(recipe, tmp_path)
    assert all(set(row["assistant_masks"]) == {1} for row in load_from_disk(out / "train"))


def test_split_is_deterministic_for_a_seed(tiny_models, finetune_sets, tmp_path):
    def eval_texts(seed, name):
        recipe = prepare_recipe(
            tiny_models,
            tmp_path,
            {"path": str(finetune_sets / "sort.messages.jsonl"), "format": "messages", "eval_size": 0.1},
            train={"seed": seed},
        )
        out, _ = run_prepare(recipe, tmp_path, name)
        kept = len(load_from_disk(out / "train")) + len(load_from_disk(out / "eval"))
        return [row["text"] for row in load_from_disk(out / "eval")], kept

    (first, kept), (again, _), (other, _) = eval_texts(1, "a"), eval_texts(1, "b"), eval_texts(2, "c")
    # 10% of the rows prepare keeps (duplicates are dropped first): the same size for every seed
    assert first == again and len(first) == len(other) == round(kept * 0.1) > 0
    assert first != other


def test_overlength_drop_and_truncate(tiny_models, tmp_path):
    source = tmp_path / "long.jsonl"
    source.write_text(
        json.dumps({"instruction": "Repeat.", "output": "a b " * 200})
        + "\n"
        + json.dumps({"instruction": "Short.", "output": "ok"})
        + "\n"
    )
    dataset = {"path": str(source), "format": "alpaca", "eval_size": 0, "max_reject_fraction": 0.5}
    out, summary = run_prepare(
        prepare_recipe(tiny_models, tmp_path, {**dataset, "overlength": "drop"}, train={"max_seq_length": 64}),
        tmp_path,
        "drop",
    )
    assert summary["kept"] == 1
    assert json.loads((out / "rejected.jsonl").read_text())["reason"] == "overlength"
    out, summary = run_prepare(
        prepare_recipe(tiny_models, tmp_path, {**dataset, "overlength": "truncate"}, train={"max_seq_length": 64}),
        tmp_path,
        "truncate",
    )
    lengths = [len(row["input_ids"]) for row in load_from_disk(out / "train")]
    assert summary["kept"] == 2 and max(lengths) == 64
    assert json.loads((out / "report.json").read_text())["truncated"] == 1


def test_fingerprint_follows_file_content(tiny_models, tmp_path):
    source = tmp_path / "data.jsonl"
    shutil.copy(EXAMPLES["alpaca"], source)
    recipe = prepare_recipe(tiny_models, tmp_path, {"path": str(source), "format": "alpaca"})
    before = hash_json(prepare.config(recipe, "ft"))
    assert hash_json(prepare.config(recipe, "ft")) == before
    with open(source, "a") as handle:
        handle.write(json.dumps({"instruction": "New row.", "output": "yes"}) + "\n")
    assert hash_json(prepare.config(recipe, "ft")) != before
    chatml = prepare_recipe(tiny_models, tmp_path, {"path": str(source), "format": "alpaca"}, chat_template="chatml")
    assert hash_json(prepare.config(chatml, "ft")) != hash_json(prepare.config(recipe, "ft"))


def test_directory_fingerprint_ignores_hidden_directories_the_loader_skips(tiny_models, tmp_path):
    source = tmp_path / "data"
    source.mkdir()
    shutil.copy(EXAMPLES["alpaca"], source / "part-0.jsonl")
    recipe = prepare_recipe(tiny_models, tmp_path, {"path": str(source), "format": "alpaca"})
    before = hash_json(prepare.config(recipe, "ft"))
    (source / ".git" / "objects").mkdir(parents=True)
    (source / ".git" / "objects" / "pack").write_text("a clone's history changes without the data changing")
    assert hash_json(prepare.config(recipe, "ft")) == before


def test_checks_name_the_problem(tiny_models, tmp_path):
    missing = prepare_recipe(tiny_models, tmp_path, {"path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(RecipeError, match=r"finetunes\.0\.dataset\.path: .*not found"):
        prepare.check(missing, "ft")
    bad_column = prepare_recipe(tiny_models, tmp_path, {"path": str(EXAMPLES["alpaca"]), "columns": {"prompt": "x"}})
    with pytest.raises(RecipeError, match=r"\['prompt'\] are not fields of format alpaca"):
        prepare.check(bad_column, "ft")
    prepare.check(prepare_recipe(tiny_models, tmp_path, {"path": "org/some-dataset"}), "ft")


def test_hub_dataset_offline_is_a_clear_error(tiny_models, tmp_path):
    """HF_HUB_OFFLINE=1 (conftest): the Hub cannot be reached, as on this project's machines."""
    recipe = prepare_recipe(tiny_models, tmp_path, {"path": "ftmerge-test/not-downloaded"})
    with pytest.raises(RuntimeError, match=r"ftmerge-test/not-downloaded.*cannot be loaded.*HF_HUB_OFFLINE"):
        run_prepare(recipe, tmp_path)
