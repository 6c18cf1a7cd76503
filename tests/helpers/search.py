"""A small search space and a cheap stand-in for scoring a merge, shared by test_search and the worker processes it
starts (they import this module, never a test module)."""

from __future__ import annotations

from pipeline.search.space import Space, merge_settings, with_baselines

SPACE = with_baselines(Space(("a", "b"), ("ties", "linear"), ("base",), (0.2, 1.5), (0.5, 1.0), (0.5, 1.0), (True,)))


def cheap_point_value(point: dict) -> dict:
    """A stand-in for scoring a merge (deterministic in the point): best near weights 0.8, gate on target_weight."""
    weights = [value for key, value in point.items() if key.startswith("weight.")]
    objective = 1 - sum((w - 0.8) ** 2 for w in weights)
    violation = max(0.0, 0.6 - point.get("target_weight", 1.0))
    return {
        "objective": objective,
        "violation": violation,
        "passes": violation == 0,
        "learned": {},
        "kept": {},
        "merge": merge_settings(point),
    }
