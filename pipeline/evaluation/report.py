"""The evaluation report: report.json (every number), report.md (tables, best per column in bold) and report.png
(grouped bars, model × set). `markdown_table` is what a model card or the console shows."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.evaluation.transfer import transfer_lines

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _best(values: list[float | None], lower_is_better: bool) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None
    return min(present) if lower_is_better else max(present)


def _table(report: dict, metric: str, cell, lower_is_better: bool) -> list[str]:
    """Rows = models, columns = sets; the cell text comes from `cell(result)`, the bold from `result[metric]` (none
    when every model ties: nothing stands out)."""
    sets = [s["name"] for s in report["sets"]]
    labels = [f"{s['name']} ({s['kind']})" for s in report["sets"]]
    best = {
        name: _best([report["results"][m].get(name, {}).get(metric) for m in report["models"]], lower_is_better)
        for name in sets
    }
    ties = {
        name: all(report["results"][m].get(name, {}).get(metric) == best[name] for m in report["models"])
        for name in sets
    }
    lines = [f"| model | {' | '.join(labels)} |", "|---|" + "---:|" * len(sets)]
    for model in report["models"]:
        cells = []
        for name in sets:
            result = report["results"][model].get(name, {})
            text = cell(result) if result.get(metric) is not None else "–"
            is_best = best[name] is not None and result.get(metric) == best[name] and not ties[name]
            cells.append(f"**{text}**" if is_best else text)
        lines.append(f"| {model} | {' | '.join(cells)} |")
    return lines


def learned_and_kept(report: dict) -> list[str]:
    """The two questions first: what each merge learned of each fine-tune (merged vs target vs its adapted model on
    the held-out set) and what it kept of each retention set (merged vs target), in exact match when generation ran,
    else in loss. Every merged model stands in its own column (the search's choice beside the published
    configuration)."""
    merged = [m for m in report["models"] if m.startswith("merged")]
    if not merged or "target" not in report["models"]:
        return []
    metric = "exact_match" if report["settings"].get("generate") else "loss"

    def value(model: str, name: str) -> str:
        result = report["results"].get(model, {}).get(name, {})
        number = result.get(metric)
        if number is None:
            return "–"
        return f"{number:.0%}" if metric == "exact_match" else f"{number:.3f}"

    unit = "greedy exact match, higher is better" if metric == "exact_match" else "loss, lower is better"
    held_out = [s["name"] for s in report["sets"] if s["kind"] == "held-out"]
    retention = [s["name"] for s in report["sets"] if s["kind"] == "retention"]

    def table(question: str, label: str, names: list[str], adapted: bool) -> list[str]:
        """One row per set: the target, the set's own adapted model (held-out sets), then each merge."""
        if not names:
            return []
        headers = ["target", *(["its adapted model"] if adapted else []), *merged]
        lines = [f"{question} ({unit}).", "", f"| {label} | {' | '.join(headers)} |", "|---|" + "---:|" * len(headers)]
        for name in names:
            models = ["target", *([f"adapted:{name}"] if adapted else []), *merged]
            lines.append(f"| {name} | " + " | ".join(value(model, name) for model in models) + " |")
        return [*lines, ""]

    return [
        *table("What did the merge learn? Each fine-tune's held-out set", "fine-tune", held_out, adapted=True),
        *table("What did it keep? Each retention set", "retention set", retention, adapted=False),
    ]


def markdown_table(report: dict) -> str:
    """The report's tables in markdown: what the merge learned and kept, each LoRA's transfer from the base to the
    target, loss (perplexity) on assistant tokens, greedy exact match (contains) when generation ran, lm-eval-harness
    results or why they were not run. Best value per column in bold."""
    parts = [
        *learned_and_kept(report),
        *transfer_lines(report.get("transfer") or {}),
        "Mean loss on assistant tokens (perplexity); lower is better.",
        "",
        *_table(report, "loss", lambda r: f"{_number(r['loss'], 3)} ({_number(r['perplexity'], 2)})", True),
    ]
    if report["settings"].get("generate"):
        parts += [
            "",
            f"Greedy answers, up to {report['settings']['max_new_tokens']} new tokens: exact match "
            "(reference contained); higher is better.",
            "",
            *_table(report, "exact_match", lambda r: f"{r['exact_match']:.0%} ({r['contains']:.0%})", False),
        ]
    parts += _lm_eval_lines(report.get("lm_eval") or {})
    return "\n".join(parts) + "\n"


def lm_eval_columns(lm_eval: dict) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score in the report, sorted."""
    results = lm_eval.get("results") or {}
    columns = {
        (task, metric) for per_model in results.values() for task, metrics in per_model.items() for metric in metrics
    }
    return sorted(columns)


def _higher_is_better(lm_eval: dict, task: str, metric: str) -> bool:
    return (lm_eval.get("higher_is_better") or {}).get(task, {}).get(metric.partition(",")[0], True)


def _lm_eval_lines(lm_eval: dict) -> list[str]:
    """The lm-eval table: a row per model, a column per (task, metric), the best per column in bold (none when every
    model ties), then the documents scored and which models were prompted through the chat template."""
    if not lm_eval.get("tasks"):
        return []
    if lm_eval.get("status"):
        return ["", f"lm-eval-harness tasks {', '.join(lm_eval['tasks'])}: {lm_eval['status']}."]
    results, columns = lm_eval["results"], lm_eval_columns(lm_eval)
    best = {}
    for task, metric in columns:
        values = [per_model.get(task, {}).get(metric) for per_model in results.values()]
        lower_is_better = not _higher_is_better(lm_eval, task, metric)
        best[task, metric] = None if len(set(values)) < 2 else _best(values, lower_is_better)
    lines = [
        "",
        "lm-eval-harness tasks (best per column in bold):",
        "",
        f"| model | {' | '.join(f'{task} {metric}' for task, metric in columns)} |",
        "|---|" + "---:|" * len(columns),
    ]
    for model, per_model in results.items():
        cells = []
        for task, metric in columns:
            value = per_model.get(task, {}).get(metric)
            text = _number(value, 4)
            cells.append(f"**{text}**" if value is not None and value == best[task, metric] else text)
        lines.append(f"| {model} | {' | '.join(cells)} |")
    samples = lm_eval.get("samples") or {}
    counts = ", ".join(f"{task} {samples[task]}" for task in sorted({t for t, _ in columns}) if task in samples)
    chat = lm_eval.get("chat_template") or {}
    templated = [model for model, applied in chat.items() if applied]
    plain = [model for model, applied in chat.items() if not applied]
    notes = [f"Documents per task: {counts}." if counts else ""]
    if chat:
        notes.append(
            f"Prompted through the chat template: {', '.join(templated) or 'none'}"
            + (f"; as plain text: {', '.join(plain)}." if plain else ".")
        )
    return [*lines, "", " ".join(note for note in notes if note)]


def write_chart(report: dict, path: Path) -> None:
    """Grouped bars, one bar per model: loss per set, exact match per set when generation ran, each LoRA's skill on
    the base and on the target (its transfer), and each lm-eval (task, metric) when the tasks ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss on assistant tokens (lower is better)")]
    if report["settings"].get("generate"):
        panels.append(("exact_match", "greedy exact match (higher is better)"))
    sets, models = [s["name"] for s in report["sets"]], report["models"]
    lm_eval = report.get("lm_eval") or {}
    columns = lm_eval_columns(lm_eval)
    transfer = report.get("transfer") or {}
    width_in = max(6, 1.6 * len(sets) * len(panels) + 1.2 * (len(columns) + len(transfer)) + 3)
    figure, axes = plt.subplots(1, len(panels) + bool(transfer) + bool(columns), figsize=(width_in, 4), squeeze=False)
    for axis, (metric, title) in zip(axes[0], panels, strict=False):
        values = {model: [report["results"][model].get(name, {}).get(metric) for name in sets] for model in models}
        _grouped_bars(axis, values, [f"{s['name']}\n({s['kind']})" for s in report["sets"]], title)
        if metric == "exact_match":
            axis.set_ylim(0, 1)
    if columns:  # a model without lm-eval scores has no bar
        results = lm_eval["results"]
        values = {model: [results.get(model, {}).get(t, {}).get(m) for t, m in columns] for model in models}
        _grouped_bars(axes[0][-1], values, [f"{t}\n{m}" for t, m in columns], "lm-eval-harness tasks")
    axes[0][-1 if columns else len(panels) - 1].legend(fontsize="small")
    if transfer:
        _transfer_bars(axes[0][len(panels)], transfer)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _transfer_bars(axis, transfer: dict[str, dict]) -> None:
    """Per adapter, its skill on its own set on the base (base + LoRA) and on the target (target + LoRA): by exact
    match, or by the loss the LoRA removes, as the transfer is measured; the ratio under each adapter's name."""
    by_loss = all(entry["metric"] == "loss" for entry in transfer.values())
    metric, keys = ("loss", ("gain_on_base", "gain_on_target")) if by_loss else ("exact_match", ("trained", "adapted"))
    values = {
        label: [entry.get(key) if entry["metric"] == metric else None for entry in transfer.values()]
        for label, key in zip(("on the base (base + LoRA)", "on the target (target + LoRA)"), keys, strict=True)
    }
    labels = [
        f"{name}\n{'–' if entry['transfer'] is None else format(entry['transfer'], '.2f') + '×'}"
        for name, entry in transfer.items()
    ]
    title = "transfer: the loss each LoRA removes" if by_loss else "transfer: each LoRA's own skill (exact match)"
    _grouped_bars(axis, values, labels, title)
    axis.legend(fontsize="small")


def _grouped_bars(axis, values: dict[str, list], labels: list[str], title: str) -> None:
    """One group of bars per label, one bar per model (`values`: model → a value or None per label)."""
    width = 0.8 / max(1, len(values))
    for index, (model, row) in enumerate(values.items()):
        positions = [position + (index - (len(values) - 1) / 2) * width for position in range(len(labels))]
        axis.bar(positions, [math.nan if v is None else v for v in row], width, label=model)
    axis.set_xticks(range(len(labels)), labels)
    axis.set_title(title)


def write_report(report: dict, out_dir: Path) -> str:
    """Write report.json, report.md and report.png into `out_dir`; returns the markdown tables."""
    out_dir = Path(out_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(report)
    (out_dir / REPORT_MD).write_text(f"# Evaluation of {report['name']}\n\n{table}", encoding="utf-8")
    write_chart(report, out_dir / REPORT_PNG)
    return table


def read_report_tables(evaluate_dir: Path) -> str | None:
    """report.md's tables without its title (for the screen at the end of a run and the model card); None without a
    report."""
    path = Path(evaluate_dir) / REPORT_MD
    return path.read_text(encoding="utf-8").split("\n", 1)[-1].strip() if path.is_file() else None


def read_lm_eval(evaluate_dir: Path) -> dict | None:
    """report.json's lm-eval section (the card's model-index); None without a report."""
    path = Path(evaluate_dir) / REPORT_JSON
    return json.loads(path.read_text(encoding="utf-8")).get("lm_eval") if path.is_file() else None


def read_transfer(evaluate_dir: Path) -> dict | None:
    """report.json's transfer per adapter (a column of the card's lineage table); None without a report."""
    path = Path(evaluate_dir) / REPORT_JSON
    return json.loads(path.read_text(encoding="utf-8")).get("transfer") if path.is_file() else None
