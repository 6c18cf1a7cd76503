"""How a merge is judged: what it learned of each fine-tune and what it kept of the target, and the gate on keeping.

    learned(f) = (merged − target) / (adapted_f − target)   on fine-tune f's held-out set: 1 means the merge does
                                                            f's skill as well as f's own adapted model, 0 as the target
    kept(r)    = merged / target                            on retention set r (accuracy), or target / merged (loss)

The objective is the mean of learned(f) over the fine-tunes, or their minimum (`worst`: no fine-tune is given up for
another); a merge passes the gate when every kept(r) is at least 1 − tolerance. Scores are exact match of greedy
answers, or the negative assistant-token loss where nothing is generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    learned: dict[str, float]
    kept: dict[str, float]
    objective: float
    passes: bool
    violation: float

    def as_dict(self) -> dict:
        return {
            "learned": self.learned,
            "kept": self.kept,
            "objective": self.objective,
            "passes": self.passes,
            "violation": self.violation,
        }


def score(result: dict, metric: str) -> float:
    """The higher-is-better number of one model on one set."""
    return result["exact_match"] if metric == "exact_match" else -result["loss"]


def learned_fraction(merged: float, target: float, adapted: float) -> float:
    """0 when the fine-tune taught nothing the target lacked (its adapted model is no better): nothing to learn."""
    gain = adapted - target
    return (merged - target) / gain if gain > 1e-9 else 0.0


def kept_fraction(merged: dict, target: dict, metric: str) -> float:
    if metric == "exact_match":
        base = target["exact_match"]
        return merged["exact_match"] / base if base > 0 else 1.0
    return target["loss"] / merged["loss"] if merged["loss"] > 0 else math.inf


def judge(
    merged: dict,
    target: dict,
    adapted: dict[str, dict],
    *,
    finetunes: list[str],
    retention: list[str],
    metric: str,
    tolerance: float,
    objective: str = "mean",
) -> Outcome:
    """`merged` and `target` map set names to results; `adapted` maps each fine-tune to its adapted model's results."""
    learned = {
        name: learned_fraction(
            score(merged[name], metric), score(target[name], metric), score(adapted[name][name], metric)
        )
        for name in finetunes
    }
    kept = {name: kept_fraction(merged[name], target[name], metric) for name in retention}
    floor = 1 - tolerance
    violation = max([0.0, *(floor - value for value in kept.values())])
    if not learned:
        value = 0.0
    elif objective == "worst":
        value = min(learned.values())
    else:
        value = sum(learned.values()) / len(learned)
    return Outcome(learned, kept, value, violation == 0.0, violation)


def choice_reason(objective: str, tolerance: float) -> str:
    """Why the chosen trial won, for the merged model's lineage."""
    learned = "learned fraction of the least-learned fine-tune" if objective == "worst" else "mean learned fraction"
    return f"the highest {learned} among trials that kept every retention set within {tolerance:g} of the target"


def objective_text(objective: str) -> str:
    """The objective and the gate in words, for the leaderboard."""
    over = "the worst fine-tune's" if objective == "worst" else "the mean over fine-tunes of"
    return (
        f"maximize {over} learned = (merged − target) / (adapted − target) on each fine-tune's held-out subset, "
        "subject to kept = merged / target ≥ 1 − tolerance on every retention set"
    )
