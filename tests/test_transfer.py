"""Transfer: each LoRA's skill on the target (target + LoRA) over its skill on the base (base + LoRA), on its own
held-out set; by exact match when answers were generated, else by the loss the LoRA removes from each model."""

import math

import pytest

from pipeline.evaluation.report import markdown_table, write_chart
from pipeline.evaluation.transfer import transfer_lines, transfer_report


def cell(loss: float, exact: float | None = None) -> dict:
    scores = {"loss": loss, "perplexity": math.exp(loss)}
    return scores if exact is None else {**scores, "exact_match": exact, "contains": exact}


RESULTS = {
    "base": {"reverse": cell(2.0, 0.0), "sort": cell(3.0, 0.0)},
    "target": {"reverse": cell(1.5, 0.1), "sort": cell(2.0, 0.0)},
    "trained:reverse": {"reverse": cell(0.5, 1.0), "sort": cell(3.0, 0.0)},
    "trained:sort": {"reverse": cell(2.0, 0.0), "sort": cell(1.0, 0.0)},
    "adapted:reverse": {"reverse": cell(0.9, 0.8), "sort": cell(2.0, 0.0)},
    "adapted:sort": {"reverse": cell(1.5, 0.1), "sort": cell(1.5, 0.0)},
}


def test_by_exact_match_the_adapted_score_over_the_trained_one():
    transfer = transfer_report(RESULTS, ["reverse", "sort"], generated=True)
    assert transfer["reverse"]["metric"] == "exact_match"
    assert transfer["reverse"]["transfer"] == pytest.approx(0.8)  # 80 % on the target / 100 % on the base
    assert (transfer["reverse"]["base"], transfer["reverse"]["target"]) == (0.0, 0.1)
    assert transfer["sort"]["transfer"] is None and "none of its own set" in transfer["sort"]["why_none"]


def test_by_loss_the_loss_removed_from_the_target_over_the_loss_removed_from_the_base():
    transfer = transfer_report(RESULTS, ["reverse", "sort"], generated=False)
    reverse, sort = transfer["reverse"], transfer["sort"]
    assert reverse["metric"] == "loss"
    # (1.5 - 0.9) / (2.0 - 0.5): a loss ratio (0.9 / 0.5) would credit the target with what it knew before
    assert (reverse["gain_on_target"], reverse["gain_on_base"]) == pytest.approx((0.6, 1.5))
    assert reverse["transfer"] == pytest.approx(0.4)
    assert sort["transfer"] == pytest.approx(0.25)


def test_models_or_sets_missing_from_the_report_give_no_transfer():
    without_trained = {label: row for label, row in RESULTS.items() if not label.startswith("trained")}
    assert transfer_report(without_trained, ["reverse", "sort"], generated=True) == {}
    without_base = {label: row for label, row in RESULTS.items() if label != "base"}
    assert transfer_report(without_base, ["reverse"], generated=False) == {}, "the loss form needs the base"
    assert set(transfer_report(without_base, ["reverse"], generated=True)) == {"reverse"}
    assert transfer_report(RESULTS, ["copy"], generated=True) == {}, "a set no adapter is named after"
    no_answers = {label: {name: cell(c["loss"]) for name, c in row.items()} for label, row in RESULTS.items()}
    assert transfer_report(no_answers, ["reverse"], generated=True)["reverse"]["metric"] == "loss", "text sets"


def test_report_table_and_chart_show_the_transfer(tmp_path):
    transfer = transfer_report(RESULTS, ["reverse", "sort"], generated=True)
    lines = transfer_lines(transfer)
    assert "| reverse | exact match | 0% | 100% | 10% | 80% | 0.80× |" in lines
    assert "| sort | exact match | 0% | 0% | 0% | 0% | – |" in lines
    report = {
        "name": "t",
        "settings": {"generate": True, "max_new_tokens": 4},
        "models": list(RESULTS),
        "sets": [{"name": "reverse", "kind": "held-out"}, {"name": "sort", "kind": "held-out"}],
        "results": RESULTS,
        "transfer": transfer,
        "lm_eval": {"tasks": []},
    }
    assert "Does each LoRA work on the target as on the base?" in markdown_table(report)
    by_loss = transfer_lines(transfer_report(RESULTS, ["reverse"], generated=False))
    assert "| reverse | loss | 2.000 | 0.500 | 1.500 | 0.900 | 0.40× |" in by_loss
    import matplotlib.figure

    titles = []
    original = matplotlib.figure.Figure.savefig

    def recorded(figure, *args, **kwargs):
        titles.extend(axis.get_title() for axis in figure.axes)
        labels = [tick.get_text() for axis in figure.axes for tick in axis.get_xticklabels()]
        titles.extend(labels)
        return original(figure, *args, **kwargs)

    matplotlib.figure.Figure.savefig = recorded
    try:
        write_chart(report, tmp_path / "report.png")
    finally:
        matplotlib.figure.Figure.savefig = original
    assert "transfer: each LoRA's own skill (exact match)" in titles and "reverse\n0.80×" in titles
