"""The run's log: a JSONL file of every metric the Trainer reports, plus tokens/s, and a progress bar showing them.

The file lives in the working directory, so a resumed run appends to the same log; records of steps after the
checkpoint it resumes from are dropped first (they are trained again) and a `resume` record marks the seam.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers.trainer_callback import ProgressCallback

from pipeline import console


class MetricsLog(ProgressCallback):
    """Replaces the Trainer's ProgressCallback: the same tqdm bar, with loss and tokens/s as its postfix instead of
    a printed dict per log, and each log appended to `log_file` (main process only). `settings` (what the machine
    made of the train config: backend, 4-bit, optimizer...) go into the start/resume record."""

    def __init__(self, log_file: Path, settings: dict | None = None):
        super().__init__()
        self.log_file = Path(log_file)
        self.settings = settings or {}
        self.last_time = self.session_start_time = time.monotonic()
        self.last_tokens = self.session_start_tokens = 0
        self.steps: console.Task | None = None  # the bar the run's console shows (the tqdm one goes to its log)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.last_time, self.last_tokens = time.monotonic(), state.num_input_tokens_seen
        self.session_start_time, self.session_start_tokens = self.last_time, self.last_tokens
        if state.is_world_process_zero:
            if self.training_bar is not None and state.global_step:
                # Start the bar where the checkpoint left off, so the ETA counts only the steps still to run.
                bar = self.training_bar
                bar.n = bar.last_print_n = bar.initial = self.current_step = state.global_step
                bar.refresh()
            self._drop_records_after(state.global_step)
            self.steps = console.open_task("train", total=state.max_steps, unit="steps", completed=state.global_step)
            event = "resume" if state.global_step else "start"
            self._append({"event": event, "step": state.global_step, "max_steps": state.max_steps, **self.settings})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "time": round(time.time(), 3), **(logs or {})}
        if "loss" in record:
            now, tokens = time.monotonic(), state.num_input_tokens_seen
            if tokens > self.last_tokens and now > self.last_time:
                record["tokens_per_second"] = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            self.last_time, self.last_tokens = now, tokens
        self._append(record)
        if self.steps is not None and "loss" in record:
            speed = f", {record['tokens_per_second']:.0f} tok/s" if "tokens_per_second" in record else ""
            self.steps.update(info=f"loss {record['loss']:.4g}{speed}")
        if self.training_bar is None:
            return
        if "loss" in record:
            postfix = {"loss": f"{record['loss']:.4g}"}
            if "tokens_per_second" in record:
                postfix["tok/s"] = f"{record['tokens_per_second']:.0f}"
            self.training_bar.set_postfix(postfix, refresh=False)
        elif "eval_loss" in record:
            self.training_bar.write(f"step {state.global_step}: eval_loss {record['eval_loss']:.4g}")

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.steps is not None:
            self.steps.update(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self.steps is not None:
            self.steps.finish()
            self.steps = None

    def session_tokens_per_second(self, state) -> float | None:
        """Tokens trained per second since this process started (or resumed) training."""
        seconds = time.monotonic() - self.session_start_time
        tokens = state.num_input_tokens_seen - self.session_start_tokens
        return round(tokens / seconds, 1) if seconds > 0 and tokens > 0 else None

    def _append(self, record: dict) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def _drop_records_after(self, step: int) -> None:
        if not self.log_file.is_file():
            return
        kept = []
        for line in self.log_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill that ended the previous run
            if record.get("step", 0) <= step:
                kept.append(line)
        self.log_file.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def read_log(log_file: Path) -> list[dict]:
    """The records of a log.jsonl, in order."""
    return [json.loads(line) for line in Path(log_file).read_text(encoding="utf-8").splitlines() if line.strip()]
