"""Rows as the prepare stage writes them, made by its own render function (ChatML template, assistant mask on each
reply and its <|im_end|>), for tests that need prepared data without running the stage."""

from __future__ import annotations

from pipeline.data import render
from pipeline.data.templates import TEMPLATES_DIR

CHATML = render.RenderSettings(
    data_format="messages",
    template=(TEMPLATES_DIR / "chatml.jinja").read_text(),
    end_of_turn="<|im_end|>",
    max_length=1_000_000,
)


def chatml_row(tokenizer, messages: list[dict]) -> dict:
    rendered = render.prepare_batch({"messages": [messages]}, [0], settings=CHATML, tokenizer=tokenizer)
    assert rendered["reason"] == [None], rendered["detail"]
    return {key: rendered[key][0] for key in ("messages", "text", "input_ids", "assistant_masks")}
