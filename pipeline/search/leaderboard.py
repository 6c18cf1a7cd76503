"""The search's outputs: every trial with its configuration, scores and gate (json and markdown), a chart of learned
vs kept with the seed and the chosen trial marked, and `chosen.yml`, the `merge:` settings the merge stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.search.objective import objective_text
from pipeline.search.space import uses_base


def write_outputs(
    out: Path,
    rows: list[dict],
    chosen: dict | None,
    *,
    references: dict,
    metric: str,
    tolerance: float,
    fallback: bool,
    objective: str = "mean",
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "objective": objective_text(objective),
        "metric": metric,
        "retention_tolerance": tolerance,
        "chosen": chosen["label"] if chosen else None,
        "fallback_to_seed": fallback,
        "references": references,
        "trials": rows,
    }
    (out / "leaderboard.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "leaderboard.md").write_text(
        markdown(rows, chosen, metric=metric, tolerance=tolerance, fallback=fallback, objective=objective)
    )
    plot_pareto(rows, chosen, out / "pareto.png", gate=1 - tolerance)
    if chosen is not None:
        chosen_document = {
            "trial": chosen["label"],
            "objective": chosen["objective"],
            "learned": chosen["learned"],
            "kept": chosen["kept"],
            "merge": chosen["merge"],
        }
        (out / "chosen.yml").write_text(yaml.safe_dump(chosen_document, sort_keys=False))


def describe(merge: dict) -> str:
    """`ties over base, normalize, target 1.00, reverse 0.80/d0.90, …` — a trial's configuration on one line."""
    parts = [f"{merge['method']} over {merge['base_model']}" if uses_base(merge["method"]) else merge["method"]]
    parameters = merge.get("parameters") or {}
    if "normalize" in parameters:
        parts.append("normalize" if parameters["normalize"] else "no normalize")
    if merge.get("include_target"):
        parts.append(f"target {merge['weight']:.2f}")
    for name, values in merge.get("models", {}).items():
        density = f"/d{values['density']:.2f}" if "density" in values else ""
        parts.append(f"{name} {values['weight']:.2f}{density}")
    return ", ".join(parts)


def markdown(
    rows: list[dict], chosen: dict | None, *, metric: str, tolerance: float, fallback: bool, objective: str = "mean"
) -> str:
    learned_sets = list(rows[0]["learned"]) if rows else []
    kept_sets = list(rows[0]["kept"]) if rows else []
    header = [
        "trial",
        "objective",
        *(f"learned {n}" for n in learned_sets),
        *(f"kept {n}" for n in kept_sets),
        "gate",
        "configuration",
    ]
    lines = [
        f"Objective: {objective_text(objective)} (tolerance {tolerance:g}; scores: {metric.replace('_', ' ')}).",
        "",
    ]
    if chosen is None or fallback:
        lines.append(
            "**No trial passed the gate**"
            + (": the seed's configuration is merged (search.fallback: seed)." if fallback else ".")
        )
    else:
        lines.append(f"Chosen: **{chosen['label']}** ({describe(chosen['merge'])}).")
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 3) + "---|---|"]
    for row in sorted(rows, key=lambda r: r["number"]):
        mark = " ✔" if chosen is not None and row["number"] == chosen["number"] and not fallback else ""
        cells = [
            f"{row['label']}{mark}",
            f"{row['objective']:.3f}",
            *(f"{row['learned'][n]:.2f}" for n in learned_sets),
            *(f"{row['kept'][n]:.2f}" for n in kept_sets),
            "pass" if row["passes"] else "fail",
            describe(row["merge"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], chosen: dict | None, path: Path, *, gate: float) -> None:
    """Learned (mean) against kept (worst retention set), one point per trial, the gate as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        kept = min(row["kept"].values()) if row["kept"] else 1.0
        color = "tab:green" if row["passes"] else "tab:gray"
        axes.scatter(kept, row["objective"], color=color, s=28, zorder=2)
        if row["label"] in ("seed", "sum") or (chosen is not None and row["number"] == chosen["number"]):
            name = row["label"] + (" (chosen)" if chosen is not None and row["number"] == chosen["number"] else "")
            axes.annotate(name, (kept, row["objective"]), textcoords="offset points", xytext=(5, 5), fontsize=9)
    axes.axvline(gate, color="tab:red", linestyle="--", linewidth=1)
    axes.set_xlabel("kept: worst retention set, merged / target")
    axes.set_ylabel("learned: mean over fine-tunes")
    axes.set_title("merge search: green passes the retention gate")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
