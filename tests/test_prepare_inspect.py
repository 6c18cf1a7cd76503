"""The label view: what the trainer will see, and the end-of-turn check that catches a model that never stops."""

import json

from datasets import load_from_disk
from helpers.prepared import EXAMPLES
from helpers.recipes import prepare_recipe_data, write_recipe
from transformers import AutoTokenizer

from pipeline import inspect
from pipeline.stages import Inputs, prepare


def write_prepare_recipe(tmp_path, tiny_models, data_format="messages"):
    dataset = {"path": str(EXAMPLES[data_format]), "format": data_format, "eval_size": 0}
    return write_recipe(tmp_path / "recipe.yaml", prepare_recipe_data(tiny_models, tmp_path, dataset))


def prepared(recipe_path):
    from pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    out = prepare.STAGE.output_path(recipe, "ft")
    out.mkdir(parents=True)
    prepare.run(recipe, "ft", out, Inputs())
    return out


def test_label_view_brackets_trained_tokens_and_checks_end_of_turn(tiny_models, tmp_path, capsys):
    recipe_path = write_prepare_recipe(tmp_path, tiny_models)
    assert inspect.main([str(recipe_path), "--finetune", "ft", "-n", "2"]) == 1
    assert "--stage prepare` first" in capsys.readouterr().err
    prepared(recipe_path)
    capsys.readouterr()
    assert inspect.main([str(recipe_path), "--finetune", "ft", "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert "[xs[::-1]<|im_end|>]" in shown
    assert "user\nWrite a Python expression" in shown and "[Write" not in shown
    assert shown.count("end-of-turn check: ok") == 2


def test_an_untrained_end_of_turn_token_is_reported(tiny_models, tmp_path, capsys):
    recipe_path = write_prepare_recipe(tmp_path, tiny_models)
    out = prepared(recipe_path)
    train = load_from_disk(str(out / "train"))
    end_of_turn_id = AutoTokenizer.from_pretrained(tiny_models["base"]).convert_tokens_to_ids("<|im_end|>")

    def forget_end_of_turn(row):
        row["assistant_masks"] = [
            0 if token == end_of_turn_id else m
            for token, m in zip(row["input_ids"], row["assistant_masks"], strict=True)
        ]
        return row

    broken = train.map(forget_end_of_turn)
    broken.save_to_disk(str(tmp_path / "broken"))
    (out / "train").rename(tmp_path / "original")
    (tmp_path / "broken").rename(out / "train")
    capsys.readouterr()
    assert inspect.main([str(recipe_path), "--finetune", "ft", "-n", "1"]) == 1
    shown = capsys.readouterr().out
    assert "PROBLEM" in shown and "do not end with the end-of-turn token" in shown
    assert json.loads((out / "report.json").read_text())["end_of_turn_token"] == "<|im_end|>"


def test_colour_on_a_terminal():
    shown = inspect.show_tokens(["a", "b", "c"], [0, 1, 1], colour=True)
    assert shown == f"{inspect.UNTRAINED}a{inspect.TRAINED}bc{inspect.RESET}"
    assert inspect.show_tokens(["a", "b", "c", "d"], [1, 0, 1, 1], colour=False) == "[a]b[cd]"
