"""The search's outputs, written and read here only: every trial with its configuration, scores and gate
(`leaderboard.json` and `.md`), a chart of learned vs kept with the published configuration and the chosen trial
marked, and `chosen.yml`, the `merge:` settings the merge stage runs. The merge and evaluate stages read them through
`SearchChoice.read` and `Leaderboard.read`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.search.objective import choice_reason, objective_text
from pipeline.search.space import PUBLISHED, SUM, uses_base

CHOICE_FILE, LEADERBOARD_JSON, LEADERBOARD_MD, PARETO_CHART = (
    "chosen.yml",
    "leaderboard.json",
    "leaderboard.md",
    "pareto.png",
)


@dataclass(frozen=True)
class SearchChoice:
    """The trial the search chose: its `merge:` settings (over the recipe's), what it scored, and why it won."""

    trial: str
    objective: float
    learned: dict[str, float]
    kept: dict[str, float]
    merge: dict
    why: str

    @classmethod
    def read(cls, search_dir: Path) -> SearchChoice:
        document = yaml.safe_load((Path(search_dir) / CHOICE_FILE).read_text(encoding="utf-8"))
        return cls(**{key: document[key] for key in cls.__dataclass_fields__})

    def write(self, search_dir: Path) -> None:
        document = {key: getattr(self, key) for key in self.__dataclass_fields__}
        (Path(search_dir) / CHOICE_FILE).write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


@dataclass(frozen=True)
class Leaderboard:
    """Every finished trial (rows with `label`, `merge`, `mergekit_config`, scores) and which one was chosen."""

    trials: list[dict]
    chosen: str | None
    fallback: bool

    @classmethod
    def read(cls, search_dir: Path) -> Leaderboard:
        document = json.loads((Path(search_dir) / LEADERBOARD_JSON).read_text(encoding="utf-8"))
        return cls(document["trials"], document["chosen"], document["fallback_to_published"])

    def trial(self, label: str) -> dict | None:
        return next((row for row in self.trials if row["label"] == label), None)


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
        "fallback_to_published": fallback,
        "references": references,
        "trials": rows,
    }
    (out / LEADERBOARD_JSON).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (out / LEADERBOARD_MD).write_text(
        markdown(rows, chosen, metric=metric, tolerance=tolerance, fallback=fallback, objective=objective),
        encoding="utf-8",
    )
    plot_pareto(rows, chosen, out / PARETO_CHART, gate=1 - tolerance)
    if chosen is not None:
        why = (
            "no trial kept every retention set: search.fallback merges the published configuration"
            if fallback
            else choice_reason(objective, tolerance)
        )
        SearchChoice(
            chosen["label"], chosen["objective"], chosen["learned"], chosen["kept"], chosen["merge"], why
        ).write(out)


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
            + (": the published configuration is merged (search.fallback: published)." if fallback else ".")
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
        if row["label"] in (PUBLISHED, SUM) or (chosen is not None and row["number"] == chosen["number"]):
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
