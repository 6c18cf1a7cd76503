"""What prepare tells its user: rejected rows with their reasons, counts, and token-length percentiles."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc


class TooManyRejected(RuntimeError):
    """More rows rejected than dataset.max_reject_fraction allows."""


def reason_counts(processed) -> Counter:
    """Rejected rows per reason code, counted in Arrow (no Python row objects)."""
    counts = pc.value_counts(processed.data.column("reason").combine_chunks()).to_pylist()
    return Counter({c["values"]: c["counts"] for c in counts if c["values"] is not None})


def check_reject_fraction(
    counts: Counter, rows_in: int, limit: float, rejected, dataset_path: str, rejected_file: Path
) -> None:
    """Fail with the top reasons, three example rows and where every rejected row is listed, when too much of the
    dataset is unusable."""
    total = sum(counts.values())
    if rows_in and total / rows_in > limit:
        top = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common(5))
        examples = "\n".join(
            f"  row {r['row']} [{r['reason']}] {r['detail']}: {(r['source'] or '')[:200]}"
            for r in rejected.select(range(min(3, len(rejected))))
        )
        raise TooManyRejected(
            f"{dataset_path}: {total} of {rows_in} rows rejected ({total / rows_in:.1%} > max_reject_fraction "
            f"{limit}). Top reasons: {top}. Examples:\n{examples}\nEvery rejected row, with its reason: "
            f"{rejected_file} (until the next run). Check dataset.format and dataset.columns, or raise "
            "dataset.max_reject_fraction."
        )


def write_rejected(rejected, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        keys = ["row", "reason", "detail", "source"]
        for batch in rejected.select_columns(keys).iter(batch_size=1000):
            for values in zip(*(batch[key] for key in keys), strict=True):
                handle.write(json.dumps(dict(zip(keys, values, strict=True))) + "\n")


def length_percentiles(kept) -> dict:
    """p50/p95/max token length of the rows kept (read as one numpy column)."""
    batches = kept.select_columns(["length"]).with_format("numpy").iter(batch_size=100_000)
    lengths = np.concatenate([batch["length"] for batch in batches]) if len(kept) else np.zeros(0)
    if not len(lengths):
        return {"p50": 0, "p95": 0, "max": 0}
    return {"p50": int(np.percentile(lengths, 50)), "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())}
