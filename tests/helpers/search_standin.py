"""A stand-in for scoring a merge, for tests of the study's machinery (processes, locks, databases) that must not
wait for models: deterministic in the point, milliseconds per trial."""

from __future__ import annotations

from pipeline.search.space import Space, merge_settings, with_baselines

SPACE = with_baselines(Space(("a", "b"), ("ties", "linear"), ("base",), (0.2, 1.5), (0.5, 1.0), (0.5, 1.0), (True,)))


def cheap_point_value(point: dict) -> dict:
    """Best near weights 0.8 (each adapter's `learned`), gate on target_weight (`kept` of a set named copy)."""
    weights = {key.split(".", 1)[1]: value for key, value in point.items() if key.startswith("weight.")}
    objective = 1 - sum((w - 0.8) ** 2 for w in weights.values())
    kept = min(1.0, point.get("target_weight", 1.0) / 0.6)
    violation = max(0.0, 0.6 - point.get("target_weight", 1.0))
    return {
        "objective": objective,
        "violation": violation,
        "passes": violation == 0,
        "learned": {name: 1 - (w - 0.8) ** 2 for name, w in weights.items()},
        "kept": {"copy": kept},
        "merge": merge_settings(point),
    }
