"""Rows that cannot become a valid conversation: each reason code, the reject report, and the reject limit."""

import json

import pytest
from datasets import load_from_disk
from helpers.recipes import prepare_recipe
from helpers.stages import run_prepare

from pipeline.data.report import TooManyRejected
from pipeline.stages import Inputs, prepare

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_ROWS = {
    "missing_field": {"conversation": []},
    "not_a_list": {"messages": "hi"},
    "not_a_string": {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
    "unknown_role": {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "empty_reply": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    "empty_turn": {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
    "no_user_turn": {"messages": [{"role": "assistant", "content": "x"}]},
    "no_reply": {"messages": [{"role": "user", "content": "hi"}]},
    "consecutive_turns": {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"},
        ]
    },
    "misplaced_system": {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "b"},
        ]
    },
}


def write_rows(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(extra_lines))


def test_every_reason_is_reported_with_its_row(tiny_models, tmp_path):
    rows = [GOOD, *BAD_ROWS.values()]
    rows += [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(8)
    ]
    rows.append(GOOD)  # an exact duplicate of row 0
    source = tmp_path / "mixed.jsonl"
    write_rows(source, rows, extra_lines=["{not json\n"])
    recipe = prepare_recipe(
        tiny_models, tmp_path, {"path": str(source), "format": "messages", "eval_size": 0, "max_reject_fraction": 0.6}
    )
    out, _summary = run_prepare(recipe, tmp_path)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    expected = {index + 1: reason for index, reason in enumerate(BAD_ROWS)} | {len(rows): "invalid_json"}
    assert {r["row"]: r["reason"] for r in rejected} == expected
    assert all(r["source"] for r in rejected)
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == len(rows) + 1
    assert report["rejected"] == len(BAD_ROWS) + 1
    assert report["rejected_by_reason"] == {reason: 1 for reason in [*BAD_ROWS, "invalid_json"]}
    assert report["deduplicated"] == 1 and report["kept"] == 9 == len(load_from_disk(out / "train"))


def test_consecutive_user_turns_are_joined(tiny_models, tmp_path):
    source = tmp_path / "split_user.jsonl"
    write_rows(
        source,
        [
            {
                "messages": [
                    {"role": "user", "content": "part one"},
                    {"role": "user", "content": "two"},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        ],
    )
    out, _ = run_prepare(
        prepare_recipe(tiny_models, tmp_path, {"path": str(source), "format": "messages", "eval_size": 0}), tmp_path
    )
    assert load_from_disk(out / "train")[0]["messages"][0] == {"role": "user", "content": "part one\ntwo"}


def test_too_many_rejects_fail_with_reasons_and_examples(tiny_models, tmp_path):
    source = tmp_path / "wrong_format.jsonl"
    write_rows(
        source, [{"question": f"q{i}", "answer": "a"} for i in range(10)] + [{"instruction": "fine", "output": "ok"}]
    )
    recipe = prepare_recipe(tiny_models, tmp_path, {"path": str(source), "format": "alpaca"})
    prepare.check(recipe, "ft")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TooManyRejected) as failure:
        prepare.run(recipe, "ft", out, Inputs())
    message = str(failure.value)
    assert "10 of 11 rows rejected" in message and "missing_field: 10" in message
    assert message.count("  row ") == 3 and '"question": "q0"' in message
    assert not (out / "train").exists()
    assert str(out / "rejected.jsonl") in message and len((out / "rejected.jsonl").read_text().splitlines()) == 10
