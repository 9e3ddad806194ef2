"""Progress on long work: bars live on a terminal, a line every few seconds in logs; a line per pipeline step."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Wrap an iterable in a progress bar on stderr; pass enabled=False on non-zero ranks."""
    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            items,
            total=total,
            desc=desc,
            disable=not enabled,
            mininterval=0.5 if interactive else 10.0,
            dynamic_ncols=interactive,
            file=sys.stderr,
        )
    )


# Colours, which orchestrators such as kfp.local write into the logs, are noise in a tail on stderr.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def shown(path: Path) -> Path:
    """A path as a person reads it on the terminal: relative to the working directory when inside it."""
    cwd = Path.cwd()
    return path.relative_to(cwd) if path.is_relative_to(cwd) else path


class _Tee(io.TextIOBase):
    """A stream that writes to a log file and to the terminal stream it stands in for."""

    def __init__(self, log: TextIO, terminal: TextIO):
        self._log, self._terminal = log, terminal

    def write(self, text: str) -> int:
        self._log.write(text)
        self._terminal.write(text)
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        self._terminal.flush()


class StepLogs:
    """One line per step on the terminal as it starts and ends, and each step's full output in its own file.

    While a step runs, whatever this process writes to stdout and stderr (an orchestrator that
    relays its step's subprocess writes there) goes into that step's log; with `verbose`, also to
    the terminal as before. What is written between steps goes into `pipeline.log` beside them.
    """

    TAIL_LINES = 20

    def __init__(self, steps: Sequence[str], verbose: bool = False):
        self.steps = tuple(steps)
        self.verbose = verbose
        self.folder: Path | None = None  # known once the first step starts
        self.paths: dict[str, Path] = {}
        self.failed: str | None = None
        self._out, self._err = sys.stdout, sys.stderr
        self._between = io.StringIO()

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        """Around the whole run: keeps what is written between steps for `pipeline.log`.

        A run that ends before its first step has no folder: what it wrote goes to stderr instead.
        """
        try:
            with self._redirect(self._between):
                yield
        finally:
            if self.folder is not None:
                path = self.folder / "pipeline.log"
                path.write_text(self._between.getvalue(), encoding="utf-8", errors="backslashreplace")
                self.paths["pipeline"] = path
            elif not self.verbose:  # verbose has streamed it already
                self._err.write(self._between.getvalue())

    @contextlib.contextmanager
    def step(self, name: str, folder: Path) -> Iterator[Callable[[str], None]]:
        """Capture one step's output in `folder/<name>.log`, between its start and end lines.

        Yields `succeeded`: call it with the step's key figures once the step succeeded. A step
        left without it failed: its end line says so and the last lines of its log go to stderr.
        """
        self.folder = folder
        path = self.paths[name] = folder / f"{name}.log"
        folder.mkdir(parents=True, exist_ok=True)
        label = f"[{self.steps.index(name) + 1}/{len(self.steps)}] {name:<{max(map(len, self.steps)) + 1}}"
        self._say(self._out, f"{label}started; log {shown(path)}")
        figures: list[str] = []
        started = time.perf_counter()
        # Line-buffered, so a `tail -f` of the log follows a long step.
        with path.open("w", encoding="utf-8", errors="backslashreplace", buffering=1) as log, self._redirect(log):
            yield figures.append
        seconds = time.perf_counter() - started
        if figures:
            self._say(self._out, f"{label}done in {seconds:.1f}s: {figures[0]}")
            return
        self.failed = name
        self._say(self._out, f"{label}FAILED after {seconds:.1f}s")
        text = ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8", errors="replace"))
        lines = [line for line in text.splitlines() if line.strip()][-self.TAIL_LINES :]
        tail = [f"last {len(lines)} lines of {shown(path)}:", *(f"  {line}" for line in lines)]
        self._say(self._err, "\n".join(tail))

    def _redirect(self, log: TextIO) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(contextlib.redirect_stdout(_Tee(log, self._out) if self.verbose else log))
        stack.enter_context(contextlib.redirect_stderr(_Tee(log, self._err) if self.verbose else log))
        return stack

    @staticmethod
    def _say(stream: TextIO, text: str) -> None:
        print(text, file=stream, flush=True)
