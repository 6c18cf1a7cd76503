"""The evaluate stage's parts on tiny real models: the loss is exactly the mean next-token loss on the assistant
tokens, the generation prompt is the chat template's, the report marks the best model per set."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.prepared import chatml_row
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.evaluation.generate import greedy_answers, prompt_ids, score_answers
from pipeline.evaluation.loss import assistant_token_loss
from pipeline.evaluation.report import markdown_table

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "sort\nc a b"},
        {"role": "assistant", "content": "a b c"},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "copy\nd e"},
        {"role": "assistant", "content": "d e"},
        {"role": "user", "content": "reverse\nf g h i"},
        {"role": "assistant", "content": "i h g f"},
    ],
]


@pytest.fixture(scope="module")
def target(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models["target"])


def hand_loss(model, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """−log p(token | everything before it), summed over the positions the mask marks (position 0 has no context)."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    scored = [i for i in range(1, len(ids)) if mask[i]]
    return -sum(log_probs[i - 1, ids[i]].item() for i in scored), len(scored)


def test_loss_is_the_mean_over_assistant_tokens_only(target):
    model, tokenizer = target
    rows = [chatml_row(tokenizer, messages) for messages in CONVERSATIONS]
    ids, masks = [r["input_ids"] for r in rows], [r["assistant_masks"] for r in rows]
    assert len(ids[0]) != len(ids[1]), "rows of different lengths exercise the padding"
    hand = [hand_loss(model, i, m) for i, m in zip(ids, masks, strict=True)]
    result = assistant_token_loss(model, ids, masks, batch_tokens=1000, pad_id=tokenizer.pad_token_id)
    assert result.tokens == sum(n for _, n in hand) == sum(map(sum, masks))
    expected = sum(total for total, _ in hand) / result.tokens
    assert result.mean == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    everything = hand_loss(model, ids[0], [1] * len(ids[0]))
    assert everything[1] > hand[0][1]
    one_row = assistant_token_loss(model, ids[:1], masks[:1], batch_tokens=1, pad_id=tokenizer.pad_token_id)
    assert one_row.mean == pytest.approx(hand[0][0] / hand[0][1], rel=1e-5)
    assert one_row.mean != pytest.approx(everything[0] / everything[1], rel=1e-3), "the mask must select tokens"


def test_generation_prompt_is_the_chat_template_up_to_the_last_answer(target):
    _, tokenizer = target
    for messages in CONVERSATIONS:
        row = chatml_row(tokenizer, messages)
        expected = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(prompt_ids(row["input_ids"], row["assistant_masks"])) == expected


def test_greedy_answers_match_unbatched_generation_and_stop_at_end_of_turn(target):
    model, tokenizer = target
    rows = [chatml_row(tokenizer, messages) for messages in CONVERSATIONS]
    prompts = [prompt_ids(r["input_ids"], r["assistant_masks"]) for r in rows]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    batched = greedy_answers(
        model, tokenizer, prompts, stop_ids=[end_of_turn], max_new_tokens=6, batch_size=2, pad_id=tokenizer.pad_token_id
    )
    for prompt, answer in zip(prompts, batched, strict=True):
        alone = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=end_of_turn,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert answer == tokenizer.decode(alone[0, len(prompt) :], skip_special_tokens=True)


def test_exact_match_and_contains():
    scored = score_answers([" a b c ", "a b c d", "x"], ["a b c", "a b c", "a b c"])
    assert (scored.exact_match, scored.contains, scored.samples) == (1 / 3, 2 / 3, 3)


def report(generate: bool = True, lm_eval: dict | None = None) -> dict:
    def cell(loss, exact):
        return {"loss": loss, "perplexity": math.exp(loss), "exact_match": exact, "contains": exact}

    return {
        "name": "demo",
        "settings": {"generate": generate, "max_new_tokens": 8},
        "models": ["base", "target", "merged"],
        "sets": [{"name": "sort", "kind": "held-out"}, {"name": "copy", "kind": "retention"}],
        "results": {
            "base": {"sort": cell(3.0, 0.0), "copy": cell(2.0, 0.1)},
            "target": {"sort": cell(2.5, 0.5), "copy": cell(0.5, 0.9)},
            "merged": {"sort": cell(0.7, 0.8), "copy": cell(0.6, 0.9)},
        },
        "lm_eval": lm_eval or {"tasks": []},
    }


def test_markdown_table_marks_the_best_model_per_set():
    lines = markdown_table(report()).splitlines()
    loss_table = lines.index("| model | sort (held-out) | copy (retention) |")
    loss_rows = {
        line.split("|")[1].strip(): line for line in lines[loss_table : loss_table + 5] if line.startswith("| ")
    }
    assert loss_rows["merged"].split("|")[2].strip() == "**0.700 (2.01)**"
    assert loss_rows["target"].split("|")[3].strip() == "**0.500 (1.65)**"
    assert "**" not in loss_rows["base"]
    exact_rows = [line for line in lines[loss_table + 5 :] if line.startswith(("| target", "| merged"))]
    assert all("**90% (90%)**" in line for line in exact_rows), "ties are all marked"
    assert "Greedy" not in markdown_table(report(generate=False))


def test_report_leads_with_what_the_merge_learned_and_kept():
    lines = markdown_table(report()).splitlines()
    assert lines[0].startswith("What did the merge learn?") and "exact match" in lines[0]
    assert "| sort | 50% | – | 80% |" in lines  # target, its adapted model (not in this report), merged
    kept = lines.index("| retention set | target | merged |")
    assert lines[kept + 2] == "| copy | 90% | 90% |"
    by_loss = markdown_table(report(generate=False)).splitlines()
    assert "loss, lower is better" in by_loss[0] and "| sort | 2.500 | – | 0.700 |" in by_loss


def test_lm_eval_not_installed_is_reported(monkeypatch):
    from pipeline.evaluation import lm_eval_tasks
    from pipeline.recipe import LmEvalConfig

    monkeypatch.setattr(lm_eval_tasks, "lm_eval_available", lambda: False)  # a machine without the lm_eval extra
    status = lm_eval_tasks.lm_eval_status(LmEvalConfig(tasks=["hellaswag"]))
    assert status == lm_eval_tasks.NOT_INSTALLED
    table = markdown_table(report(lm_eval={"tasks": ["hellaswag"], "status": status}))
    assert f"lm-eval-harness tasks hellaswag: {lm_eval_tasks.NOT_INSTALLED}." in table
