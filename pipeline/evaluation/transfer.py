"""Transfer: how much of what each LoRA learned on the base it still does on the target it is applied to.

A LoRA is trained on the base (`trained:<name>` = base + LoRA) and applied to the target (`adapted:<name>` = target +
LoRA). Its transfer is its skill on the target over its skill on the base, on its own fine-tune's held-out set:

- by greedy exact match (when `evaluate.generate` scored answers): EM(target + LoRA) / EM(base + LoRA);
- by loss otherwise, as the loss each model loses to the LoRA: (L(target) − L(target + LoRA)) / (L(base) −
  L(base + LoRA)). A ratio of the two losses would credit the target with what it knew before the LoRA, and an
  instruct target often starts lower on a chat-formatted set than the base does.

1.0: the LoRA does on the target what it did on the base. Well below 1 is the first thing to look at when a merge
disappoints: a merge cannot learn more of a fine-tune than its adapted model does.
"""

from __future__ import annotations

import math


def _score(results: dict, model: str, name: str, metric: str) -> float | None:
    value = results.get(model, {}).get(name, {}).get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def adapter_transfer(results: dict, name: str, metric: str) -> dict | None:
    """The transfer of adapter `name` on its own set `name`, from {model label: {set: metrics}}; None when the report
    lacks `trained:<name>` or `adapted:<name>` on that set (or, by loss, the base or the target)."""
    on_base = _score(results, f"trained:{name}", name, metric)
    on_target = _score(results, f"adapted:{name}", name, metric)
    if on_base is None or on_target is None:
        return None
    base, target = _score(results, "base", name, metric), _score(results, "target", name, metric)
    entry = {"metric": metric, "base": base, "trained": on_base, "target": target, "adapted": on_target}
    if metric == "exact_match":
        entry["transfer"] = on_target / on_base if on_base > 0 else None
        if on_base <= 0:
            entry["why_none"] = "the LoRA answers none of its own set on the base"
        return entry
    if base is None or target is None:
        return None
    gain_on_base, gain_on_target = base - on_base, target - on_target
    entry.update(gain_on_base=gain_on_base, gain_on_target=gain_on_target)
    entry["transfer"] = gain_on_target / gain_on_base if gain_on_base > 0 else None
    if gain_on_base <= 0:
        entry["why_none"] = "the LoRA lowers no loss of its own set on the base"
    return entry


def transfer_report(results: dict, held_out: list[str], generated: bool) -> dict[str, dict]:
    """{adapter: transfer entry} for every fine-tune whose held-out set was scored on both its trained and adapted
    models; by exact match when `generated` (and the set has reference answers), else by loss."""
    report = {}
    for name in held_out:
        exact = generated and _score(results, f"trained:{name}", name, "exact_match") is not None
        entry = adapter_transfer(results, name, "exact_match" if exact else "loss")
        if entry is not None:
            report[name] = entry
    return report


def transfer_lines(transfer: dict[str, dict]) -> list[str]:
    """The report's transfer table: each adapter's own skill on the base and on the target, and their ratio."""
    if not transfer:
        return []

    def shown(entry: dict, key: str) -> str:
        value = entry.get(key)
        if value is None:
            return "–"
        return f"{value:.0%}" if entry["metric"] == "exact_match" else f"{value:.3f}"

    lines = [
        "Does each LoRA work on the target as on the base? Its own held-out set; transfer = its skill on the target "
        "over its skill on the base (exact match: adapted / trained; loss: the loss it removes from the target over "
        "the loss it removes from the base).",
        "",
        "| adapter | metric | base | trained (base + LoRA) | target | adapted (target + LoRA) | transfer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in transfer.items():
        ratio = "–" if entry["transfer"] is None else f"{entry['transfer']:.2f}×"
        metric = "exact match" if entry["metric"] == "exact_match" else "loss"
        lines.append(
            f"| {name} | {metric} | {shown(entry, 'base')} | {shown(entry, 'trained')} | {shown(entry, 'target')} | "
            f"{shown(entry, 'adapted')} | {ratio} |"
        )
    return [*lines, ""]
