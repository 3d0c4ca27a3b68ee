"""Progress of a judge run on stderr.

On a terminal: a Rich bar (done / total, items/s, elapsed, ETA) that goes away at the end. Elsewhere
(nohup, a pipe, a log file): a plain line every PLAIN_EVERY seconds with done / total, items/s and
the ETA, and one at the end, so that a log shows a long run moving and how it ended; a run that
ends before the first line is due prints nothing (quiet by default).
"""

from __future__ import annotations

import sys
import threading
import time

PLAIN_EVERY = 30.0  # seconds between plain lines (a module constant, so that tests can make it small)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``with Progress("trcli judge", total, "items") as p: ... p.advance()``; advance() may be
    called from any thread."""

    def __init__(self, label: str, total: int, unit: str = "items", stream=None, tty: bool | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self.lines = 0  # plain lines printed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = self._thread = None
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if total <= 0:
            return
        if tty:
            self._bar = self._rich()
        else:
            self._thread = threading.Thread(target=self._tick, name="trcli-progress", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ terminal

    def _rich(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, ProgressColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        unit = self.unit

        class Rate(ProgressColumn):
            def render(self, task):
                return Text("-" if task.speed is None else f"{task.speed:.2f} {unit}/s")

        bar = Bar("{task.description}", BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                  "ETA", TimeRemainingColumn(), console=Console(file=self.stream, force_terminal=True),
                  transient=True)
        self._task = bar.add_task(self.label, total=self.total)
        bar.start()
        return bar

    # ------------------------------------------------------------ plain lines

    def _tick(self) -> None:
        while not self._stop.wait(PLAIN_EVERY):
            self._line()

    def _line(self, final: bool = False) -> None:
        with self._lock:
            done, elapsed = self.done, time.monotonic() - self.start
            rate = done / elapsed if elapsed > 0 else 0.0
            if final:
                text = f"{self.label}: {done}/{self.total} {self.unit} in {duration(elapsed)}, {rate:.2f} {self.unit}/s"
            else:
                eta = duration((self.total - done) / rate) if rate > 0 else "unknown"
                text = (f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%), "
                        f"{rate:.2f} {self.unit}/s, ETA {eta}")
            print(text, file=self.stream, flush=True)
            self.lines += 1

    # ------------------------------------------------------------ both

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def close(self, completed: bool = True) -> None:
        """Stop; in plain mode, end with a final line when any line was printed (not after an error)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if completed and self.lines:
                self._line(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(completed=exc_type is None)
