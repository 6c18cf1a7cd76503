"""The run's console: stage lines and progress on the screen, every library's output in `<output_dir>/logs/`.

Libraries print banners, deprecation warnings and a bar per model loaded, some from C code, some from the training
child process. So while a run lasts, file descriptors 1 and 2 (C extensions and child processes inherit them),
Python's sys.stdout/sys.stderr and the logging handlers that wrote to them all feed one pipe, copied to a log file
per run. The screen gets what `say` prints and the bars `progress` opens: rich bars on a terminal, a plain line
every PLAIN_INTERVAL_SECONDS otherwise (CI logs, Colab cells). `--verbose` also copies the log to the screen.

A child process (training, search workers) inherits the pipe and reports its progress as marker lines on it; the
parent turns them back into bars. `tqdm` here is a drop-in for `from tqdm import tqdm` drawn the same way.

What reaches the screen, the one rule every stage follows: a line per step (the runner's), progress bars while it
runs, and, under the step's line, a `notice` for everything a user must act on or would want to know — rows
rejected and where they are listed, duplicates removed, rows truncated, training resumed from a checkpoint, a dtype
cast or an optimizer fallback, a warning about the output (a vocabulary that changed size, a tokenizer llama.cpp may
read wrongly), what was uploaded, search trials redone, a stage the recipe does not enable, `trust_remote_code` on.
A notice is logged in the same words. Everything else (libraries' output, per-trial and per-model progress lines)
goes to the log only, and to the screen with `--verbose`.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TextIO

PLAIN_INTERVAL_SECONDS = 10.0
CHILD_ENVIRONMENT = "FTMERGE_PROGRESS_MARKERS"
MARKER = "\x1eftmerge-progress "
PUMP_JOIN_SECONDS = 5.0

_run: _Run | None = None
_keys = itertools.count()


class Task:
    """One bar: `advance` by done units, `update` to an absolute count; `info` is shown after the count (loss,
    best score so far). `finish` removes it; the step's own line says how it ended."""

    def __init__(self, display, key: str, description: str, total: int | None, unit: str, completed: int = 0):
        self.display, self.key = display, key
        self.completed, self.info = completed, ""
        display.start(key, description, total, unit, completed)

    def advance(self, amount: float = 1, info: str | None = None) -> None:
        self.update(self.completed + amount, info)

    def update(self, completed: float | None = None, info: str | None = None) -> None:
        self.completed = self.completed if completed is None else completed
        self.info = self.info if info is None else info
        self.display.update(self.key, self.completed, self.info)

    def finish(self) -> None:
        self.display.finish(self.key)


def open_task(description: str, total: int | None = None, unit: str = "", completed: int = 0) -> Task:
    """A bar on whatever shows progress here: this run's screen, the parent's (in a child process), or nowhere."""
    return Task(_display(), f"{os.getpid()}:{next(_keys)}", description, total, unit, completed)


@contextlib.contextmanager
def progress(description: str, total: int | None = None, unit: str = "", completed: int = 0):
    task = open_task(description, total, unit, completed)
    try:
        yield task
    finally:
        task.finish()


class tqdm:
    """What this project's code uses of tqdm (iterate, `with`, update, set_postfix, close), drawn by `progress`."""

    def __init__(
        self,
        iterable=None,
        desc: str | None = None,
        total: int | None = None,
        unit: str = "it",
        initial: int = 0,
        **_tqdm_options,
    ):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable = iterable
        self.task = open_task(desc or "", total, unit, initial)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.task.advance()
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.task.advance(n)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **fields) -> None:
        self.task.update(info=", ".join(f"{k} {v}" for k, v in {**(ordered_dict or {}), **fields}.items()))

    def close(self) -> None:
        self.task.finish()


def notice(text: str) -> None:
    """Something the user must act on or would want to know (see the rule above): logged now, and shown under the
    line of the step that raised it (`take_notices`); outside a run, printed at once. In a child process of a run it
    travels to the parent as a marker line."""
    if _run is not None:
        _run.notice(text)
    elif os.environ.get(CHILD_ENVIRONMENT):
        MarkerDisplay()._send(op="notice", text=text)
    else:
        print(text, flush=True)


def take_notices() -> list[str]:
    """The notices raised since the last call, for the runner to show under a step's line."""
    if _run is None:
        return []
    with _run.lock:
        taken, _run.notices = _run.notices, []
    return taken


def say(text: str = "", *, error: bool = False) -> None:
    """A line for the user: on the screen (stderr for errors), and in the run's log for context."""
    if _run is None:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)
        return
    _run.say(text, error)


def log_file() -> Path | None:
    """The log of the run in progress, for a failure line that says where the traceback is."""
    return None if _run is None else _run.log_path


def new_log_path(output_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(output_dir) / "logs" / f"run-{stamp}-{os.getpid()}.log"


@contextlib.contextmanager
def run_console(output_dir: Path, *, verbose: bool = False, command: str = ""):
    """Everything printed or logged inside goes to a new log file under `<output_dir>/logs/` (and to the screen with
    `verbose`); `say` and `progress` reach the screen. Nested uses (the demo, the notebook) share the outer one."""
    global _run
    if _run is not None:
        yield _run.log_path
        return
    path = new_log_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    run = _Run(path, verbose)
    run.log.write(f"# ftmerge {command} (pid {os.getpid()}, {datetime.now().isoformat(timespec='seconds')})\n")
    _run = run
    previous_marker = os.environ.get(CHILD_ENVIRONMENT)
    os.environ[CHILD_ENVIRONMENT] = "1"
    try:
        with run.redirected():
            yield path
    finally:
        _run = None
        if previous_marker is None:
            os.environ.pop(CHILD_ENVIRONMENT, None)
        else:
            os.environ[CHILD_ENVIRONMENT] = previous_marker
        run.close()


def _display():
    if _run is not None:
        return _run.display
    if os.environ.get(CHILD_ENVIRONMENT):
        return MarkerDisplay()
    return NullDisplay()


class NullDisplay:
    """Outside a run (a test calling a stage function): no bars."""

    def start(self, key, description, total, unit, completed) -> None:
        pass

    def update(self, key, completed, info) -> None:
        pass

    def finish(self, key) -> None:
        pass


class MarkerDisplay:
    """In a child process: each event is a marker line on stdout, which the parent's pump draws."""

    def _send(self, **event) -> None:
        sys.stdout.write(MARKER + json.dumps(event) + "\n")
        sys.stdout.flush()

    def start(self, key, description, total, unit, completed) -> None:
        self._send(op="start", key=key, description=description, total=total, unit=unit, completed=completed)

    def update(self, key, completed, info) -> None:
        self._send(op="update", key=key, completed=completed, info=info)

    def finish(self, key) -> None:
        self._send(op="finish", key=key)


class PlainDisplay:
    """Not a terminal: a line per bar every PLAIN_INTERVAL_SECONDS (counted from its start), nothing redrawn."""

    def __init__(self, write):
        self.write = write
        self.tasks: dict[str, dict] = {}

    def start(self, key, description, total, unit, completed) -> None:
        self.tasks[key] = {"description": description, "total": total, "unit": unit, "shown": time.monotonic()}

    def update(self, key, completed, info) -> None:
        task = self.tasks.get(key)
        if task is None or task["total"] is None or time.monotonic() - task["shown"] < PLAIN_INTERVAL_SECONDS:
            return
        task["shown"] = time.monotonic()
        count = f"{completed:g}/{task['total']} {task['unit']}".rstrip()
        self.write(f"  {task['description']}: {count}" + (f", {info}" if info else ""))

    def finish(self, key) -> None:
        self.tasks.pop(key, None)

    def print(self, text: str, file: TextIO) -> None:
        print(text, file=file, flush=True)

    def close(self) -> None:
        pass


class RichDisplay:
    """A terminal: rich bars (a spinner where the total is unknown) under the stage lines, gone when finished."""

    def __init__(self, screen: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.progress = Progress(
            *columns, console=Console(file=screen), transient=True, redirect_stdout=False, redirect_stderr=False
        )
        self.tasks: dict[str, int] = {}
        self.lock = threading.Lock()
        self.progress.start()

    def start(self, key, description, total, unit, completed) -> None:
        with self.lock:
            self.tasks[key] = self.progress.add_task(description, total=total, completed=completed, unit=unit, info="")

    def update(self, key, completed, info) -> None:
        with self.lock:
            if key in self.tasks:
                self.progress.update(self.tasks[key], completed=completed, info=info)

    def finish(self, key) -> None:
        with self.lock:
            if key in self.tasks:
                self.progress.remove_task(self.tasks.pop(key))

    def print(self, text: str, file: TextIO) -> None:
        if file is self.progress.console.file:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=file, flush=True)

    def close(self) -> None:
        self.progress.stop()


def _screen_streams() -> tuple[TextIO, TextIO, list[TextIO]]:
    """Where the user looks, kept apart from the redirected descriptors: duplicates of fds 1 and 2 when sys.stdout
    and sys.stderr write to them (a terminal, a pipe), else the objects themselves (a notebook cell, pytest)."""
    streams, opened = [], []
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        try:
            on_fd = stream.fileno() == fd
        except (AttributeError, OSError, ValueError):
            on_fd = False
        if on_fd:
            stream.flush()
            stream = open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
            opened.append(stream)
        streams.append(stream)
    return streams[0], streams[1], opened


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class _Run:
    def __init__(self, log_path: Path, verbose: bool):
        self.log_path, self.verbose = log_path, verbose
        self.log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.screen, self.screen_errors, self.opened = _screen_streams()
        self.lock = threading.Lock()
        live = _is_terminal(self.screen) and not verbose
        self.display = RichDisplay(self.screen) if live else PlainDisplay(lambda text: self.say(text, False))
        self.markers: dict[str, str] = {}
        self.notices: list[str] = []

    def notice(self, text: str) -> None:
        with self.lock:
            self.log.write(f"[ftmerge] note: {text}\n")
            self.notices.append(text)

    def say(self, text: str, error: bool) -> None:
        with self.lock:
            self.log.write(f"[ftmerge] {text}\n")
        self.display.print(text, self.screen_errors if error else self.screen)

    @contextlib.contextmanager
    def redirected(self):
        """fds 1 and 2, sys.stdout/sys.stderr and the logging handlers that held them, into the pump; warnings and
        records of loggers without a handler too (explicitly: a host such as pytest may have taken them over)."""
        read_end, write_end = os.pipe()
        pump = threading.Thread(target=self._pump, args=(read_end,), daemon=True, name="ftmerge-log-pump")
        pump.start()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, OSError, ValueError):
                stream.flush()
        saved_fds = os.dup(1), os.dup(2)
        saved_streams = sys.stdout, sys.stderr
        writer = open(os.dup(write_end), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        handlers = _handlers_writing_to(saved_streams)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        sys.stdout = sys.stderr = writer
        for handler in handlers:
            handler.setStream(writer)
        catch_all = logging.StreamHandler(writer)
        catch_all.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(catch_all)
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            logging.getLogger().removeHandler(catch_all)
            writer.flush()
            for handler, stream in handlers.items():
                handler.setStream(stream)
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            writer.close()
            pump.join(PUMP_JOIN_SECONDS)  # a process that outlived the run may still hold the pipe

    def _pump(self, read_end: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        with contextlib.suppress(OSError):
            while chunk := os.read(read_end, 65536):
                pending = self._consume(pending + decoder.decode(chunk))
        self._consume(pending, final=True)
        os.close(read_end)

    def _consume(self, text: str, final: bool = False) -> str:
        """Log everything but the marker lines, which move bars; returns a tail that may be the start of one."""
        *lines, tail = text.split("\n")
        for line in lines:
            if line.startswith(MARKER):
                self._apply_marker(line[len(MARKER) :])
            else:
                self._library_output(line + "\n")
        if final or not (MARKER.startswith(tail) or tail.startswith(MARKER)):
            self._library_output(tail)
            return ""
        return tail

    def _library_output(self, text: str) -> None:
        if not text:
            return
        with self.lock:
            self.log.write(text)
        if self.verbose:
            self.screen.write(text)
            self.screen.flush()

    def _apply_marker(self, payload: str) -> None:
        try:
            event = json.loads(payload)
            if event["op"] == "notice":
                self.notice(event["text"])
                return
            key = f"child:{event['key']}"
            if event["op"] == "start":
                self.display.start(key, event["description"], event["total"], event["unit"], event["completed"])
            elif event["op"] == "update":
                self.display.update(key, event["completed"], event["info"])
            else:
                self.display.finish(key)
        except (ValueError, KeyError, TypeError):
            self._library_output(MARKER + payload + "\n")

    def close(self) -> None:
        self.display.close()
        for stream in self.opened:
            stream.close()
        self.log.close()


def _handlers_writing_to(streams) -> dict[logging.StreamHandler, TextIO]:
    """Logging handlers made before the run that write to the screen's Python streams (transformers makes its own at
    import): in a notebook those streams are the cell, so they are pointed at the pump for the run."""
    loggers = [
        logging.getLogger(),
        *(logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)),
    ]
    return {
        handler: handler.stream
        for logger in loggers
        for handler in logger.handlers
        if type(handler) is logging.StreamHandler and any(handler.stream is s for s in streams)
    }
