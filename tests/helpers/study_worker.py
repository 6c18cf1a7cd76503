"""One worker process on a study in a database, scoring trials with the stand-in objective (tests of the study's
machinery across processes and machines, without models). The study's URL comes from FTMERGE_SEARCH_STORAGE.

    python tests/helpers/study_worker.py TOTAL [--start-at EPOCH] [--trial-seconds S] [--pause-at N --marker PATH]

Prints one JSON line at the end: {"done": trials finished here, "host": this process's host name}. `--pause-at N`
stops inside its N-th trial (after writing the point to `--marker`) until it is killed.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.*

from helpers.search_standin import SPACE, cheap_point_value
from pipeline.search.coordination import DatabaseCoordination, Heartbeat
from pipeline.search.space import baselines, suggest
from pipeline.search.storage import resolve_storage
from pipeline.search.study import open_study, run_trials

STUDY = "s"
HEARTBEAT = Heartbeat(interval=1, grace_period=6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("total", type=int)
    parser.add_argument("--start-at", type=float, default=0.0, help="wait until this time.time() (start together)")
    parser.add_argument("--trial-seconds", type=float, default=0.05)
    parser.add_argument("--pause-at", type=int, default=0)
    parser.add_argument("--marker", type=Path)
    args = parser.parse_args()
    storage = resolve_storage("${FTMERGE_SEARCH_STORAGE}")
    study = open_study(storage, STUDY, HEARTBEAT)
    coordination = DatabaseCoordination(storage, STUDY, HEARTBEAT, reconnect_seconds=60)
    time.sleep(max(0.0, args.start_at - time.time()))
    count = 0

    def evaluate(point: dict) -> dict:
        nonlocal count
        count += 1
        if count == args.pause_at:
            args.marker.write_text(json.dumps(point))
            time.sleep(600)
        time.sleep(args.trial_seconds)
        return cheap_point_value(point)

    done = run_trials(
        study,
        total=args.total,
        baselines=baselines(SPACE.adapters),
        suggest=lambda trial: suggest(trial, SPACE),
        evaluate=evaluate,
        coordination=coordination,
        seed=7,
    )
    print(json.dumps({"done": done, "host": socket.gethostname()}), flush=True)


if __name__ == "__main__":
    main()
