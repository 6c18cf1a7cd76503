"""Self-distilled replay (`finetunes[].replay`): prompts of a dataset answered greedily by the base model in the
recipe's chat template, mixed into the fine-tune's training rows, cached by content, reported."""

import json
import shutil

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.data import replay
from pipeline.data.formats import RowRejected, to_conversation
from pipeline.data.templates import TEMPLATES_DIR
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import Inputs, prepare

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def talking_base(tiny_models, tmp_path_factory):
    """The tiny random base with its <|im_end|> logit raised (its lm_head row × 4), so that greedy answers end at
    various lengths: within MAX_NEW_TOKENS about half of them do, the others are cut short."""
    base = tmp_path_factory.mktemp("talking") / "base"
    shutil.copytree(tiny_models["base"], base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    end = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.weight[end] *= 4
    model.save_pretrained(base)
    return base


def prompts_file(path, rows=60, distinct=30):
    """Alpaca rows with an output (never used), each prompt twice, and two rows that are no prompt."""
    lines = [{"instruction": f"Tell me about item {index % distinct}", "output": "ignored"} for index in range(rows)]
    lines += [{"instruction": "", "output": "no prompt"}, {"output": "no instruction"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def own_rows_file(path, rows=40):
    """The fine-tune's own rows: messages, each ending with its reply."""
    lines = [
        {"messages": [{"role": "user", "content": f"reverse\n{index} b c"}, {"role": "assistant", "content": "c b"}]}
        for index in range(rows)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def make_recipe(tiny_models, base, tmp_path, replay_settings, name="ft"):
    own = tmp_path / "own.messages.jsonl"
    if not own.is_file():
        own_rows_file(own)
    return Recipe.model_validate(
        {
            "name": "replay",
            "output_dir": str(tmp_path / "run"),
            "base_model": str(base),
            "target_model": str(tiny_models["target"]),
            "finetunes": [
                {
                    "name": name,
                    "dataset": {"path": str(own), "format": "messages", "eval_size": 0.1},
                    "replay": replay_settings,
                }
            ],
            "train": {"max_seq_length": 512},
        }
    )


def run_prepare(recipe, out):
    name = recipe.finetunes[0].name
    prepare.check(recipe, name)
    out.mkdir()
    return prepare.run(recipe, name, out, Inputs())


def own_greedy_answer(model, tokenizer, conversation) -> str:
    """The base's greedy answer to one prompt, generated alone (no batch, no padding) in the target's template."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    output = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stops)
    new = output[0, ids["input_ids"].shape[1] :]
    assert new[-1] in stops, "only finished answers become replay rows"
    return tokenizer.decode(new, skip_special_tokens=True)


def test_prompt_only_keeps_the_conversation_up_to_its_last_user_turn():
    alpaca = {"instruction": "Name it", "input": "a b", "output": "c"}
    assert to_conversation(alpaca, "alpaca", {}, None, prompt_only=True) == [
        {"role": "user", "content": "Name it\na b"}
    ]
    assert to_conversation({"instruction": "Go"}, "alpaca", {}, "Be brief.", prompt_only=True) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Go"},
    ]
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "?"},
    ]
    reply = [{"role": "assistant", "content": "!"}]
    assert to_conversation({"messages": turns + reply}, "messages", {}, None, prompt_only=True) == turns
    with pytest.raises(RowRejected, match="no_user_turn"):
        to_conversation({"messages": reply}, "messages", {}, None, prompt_only=True)
    with pytest.raises(RowRejected, match="no_reply"):  # training rows still need their reply
        to_conversation({"messages": turns}, "messages", {}, None)


def test_replay_rows_are_the_bases_own_greedy_answers_mixed_into_train_only(
    tiny_models, talking_base, tmp_path, capsys
):
    settings = {
        "dataset": {"path": str(prompts_file(tmp_path / "general.jsonl")), "format": "alpaca"},
        "fraction": 0.5,
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": 4,
        "device": "cpu",
    }
    recipe = make_recipe(tiny_models, talking_base, tmp_path, settings)
    out = tmp_path / "prepared"
    summary = run_prepare(recipe, out)
    report = json.loads((out / "report.json").read_text())["replay"]

    own_rows = summary["train_rows"] - summary["replay_rows"]
    assert report["requested"] == replay.replay_count(own_rows, 0.5) == own_rows == 36  # half of the train rows
    # 36 asked for, 30 distinct prompts in the file: every row is read, each prompt drawn once
    assert report["dataset_rows"] == 62 and report["rejected_by_reason"] == {"missing_field": 1, "empty_turn": 1}
    assert report["prompts"] == 30 and report["duplicates"] == 30
    assert report["rows"] == summary["replay_rows"] == report["prompts"] - report["unfinished"] - report["empty"]
    assert 0 < report["unfinished"] < report["prompts"], "the fixture's base finishes some answers, not all"
    assert report["answered_by"] == str(talking_base) and report["cached"] == 0
    assert f"{report['rows']} replay rows" in capsys.readouterr().out, "the screen says how many and from where"

    train, held_out = load_from_disk(str(out / "train")), load_from_disk(str(out / "eval"))
    replayed = [row["messages"] for row in train if row["messages"][0]["content"].startswith("Tell me about item")]
    assert len(replayed) == report["rows"]
    assert not any("Tell me about item" in row["messages"][0]["content"] for row in held_out), "train only"
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["target"])
    base = AutoModelForCausalLM.from_pretrained(talking_base, dtype=torch.float32).eval()
    for conversation in replayed:
        assert conversation[-1]["content"] == own_greedy_answer(base, tokenizer, conversation[:-1])
        assert conversation[-1]["content"] != "ignored", "the dataset's own outputs are never used"


def test_answers_are_cached_by_content_and_the_fingerprint_follows_what_changes_the_rows(
    tiny_models, talking_base, tmp_path, monkeypatch
):
    settings = {
        "dataset": {"path": str(prompts_file(tmp_path / "general.jsonl")), "format": "alpaca"},
        "max_new_tokens": MAX_NEW_TOKENS,
        "device": "cpu",
    }
    first = make_recipe(tiny_models, talking_base, tmp_path, settings)
    run_prepare(first, tmp_path / "first")
    # another fine-tune with the same replay (the same prompts drawn): nothing is generated again
    generated = []
    answer_prompts = replay.answer_prompts

    def recorded(model_dir, prompts, *args, **kwargs):
        generated.append(len(prompts))
        return answer_prompts(model_dir, prompts, *args, **kwargs)

    monkeypatch.setattr(replay, "answer_prompts", recorded)
    second = make_recipe(tiny_models, talking_base, tmp_path, settings, name="other")
    run_prepare(second, tmp_path / "second")
    reports = [json.loads((tmp_path / d / "report.json").read_text())["replay"] for d in ("first", "second")]
    assert generated == [] and reports[0]["cached"] == 0
    assert reports[1] == {**reports[0], "cached": reports[0]["prompts"]}
    train = [load_from_disk(str(tmp_path / d / "train"))["input_ids"] for d in ("first", "second")]
    assert train[0] == train[1]
    # more prompts drawn in the same seeded order: only those never answered are generated
    more = make_recipe(tiny_models, talking_base, tmp_path, {**settings, "fraction": 0.45}, name="more")
    run_prepare(more, tmp_path / "more")
    third = json.loads((tmp_path / "more" / "report.json").read_text())["replay"]
    assert third["prompts"] == replay.replay_count(36, 0.45) == 29 and reports[0]["prompts"] == 24
    assert generated == [5] and third["cached"] == 24

    fingerprint = prepare.config(first, "ft")
    assert fingerprint["replay"]["base_model"]
    for change in ({"fraction": 0.2}, {"max_new_tokens": 5}, {"dtype": "bfloat16"}):
        changed = make_recipe(tiny_models, talking_base, tmp_path, {**settings, **change})
        assert prepare.config(changed, "ft") != fingerprint, change
    unchanged = make_recipe(tiny_models, talking_base, tmp_path, {**settings, "batch_size": 2, "device": "auto"})
    assert prepare.config(unchanged, "ft") == fingerprint, "batch size and device change no row"
    (tmp_path / "general.jsonl").write_text((tmp_path / "general.jsonl").read_text().replace("item", "thing"))
    assert prepare.config(first, "ft") != fingerprint, "the prompts' content"


def test_a_replay_the_base_cannot_answer_from_is_refused_naming_the_key(tiny_models, tmp_path):
    text = {"dataset": {"path": str(TEMPLATES_DIR / "text.example.csv"), "format": "text"}}
    with pytest.raises(RecipeError, match=r"finetunes\.0\.replay\.dataset\.format: text has no prompts"):
        prepare.check(make_recipe(tiny_models, tiny_models["base"], tmp_path, text), "ft")
    missing = {"dataset": {"path": str(tmp_path / "nowhere.jsonl"), "format": "alpaca"}}
    with pytest.raises(RecipeError, match=r"finetunes\.0\.replay\.dataset\.path: dataset file or directory not found"):
        prepare.check(make_recipe(tiny_models, tiny_models["base"], tmp_path, missing), "ft")
    with pytest.raises(ValueError, match="fraction"):
        make_recipe(tiny_models, tiny_models["base"], tmp_path, {**missing, "fraction": 1.0})
