"""Progress of long work on stderr: training steps, evaluation, generation, judging.

On a terminal: a Rich bar (done / total, rate, tokens/s, elapsed, ETA, a note such as the loss)
that goes away at the end; work started while a bar is showing (sft's evaluation inside training)
adds its own row to it. Elsewhere (nohup, a pipe, a log file): a plain line whenever the caller
asks for one (training's --logging-steps) and at least every PLAIN_EVERY seconds otherwise, with
done / total, the rate, tokens/s and the ETA, and a last line at the end, so that a log shows long
work moving and how it ended; work that ends before the first line is due prints nothing. Nothing
under -q (trcli.verbosity).
"""

from __future__ import annotations

import sys
import threading
import time

from trcli import verbosity

PLAIN_EVERY = 30.0  # seconds between plain lines (a module constant, so that tests can make it small)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _rate(per_second: float, unit: str, seconds_per: bool) -> str:
    """'3.20 items/s', or for slow units (training steps) '1.52 s/step'."""
    if seconds_per:
        return f"{1 / per_second:.2f} s/{unit.removesuffix('s')}" if per_second > 0 else f"- s/{unit.removesuffix('s')}"
    return f"{per_second:.2f} {unit}/s"


class _Shared:
    """The one Rich bar on the terminal; each Progress on it is a row (a task)."""

    bar = None
    users = 0


class Progress:
    """``with Progress("trcli judge", total, "items") as p: ... p.advance()``; advance() may be
    called from any thread.

    ``total``: None when it is not known ahead (the rows of a file being read): counts and rates, no ETA.
    ``start``: units done before (a resumed run); rates and the ETA count the work done here.
    ``seconds_per``: show the rate as seconds per unit (training steps) rather than units per second.
    ``every``: seconds between plain lines when no line was asked for (None: PLAIN_EVERY).
    ``enabled``: False shows nothing (e.g. on every rank but the first)."""

    def __init__(self, label: str, total: int | None, unit: str = "items", stream=None, tty: bool | None = None,
                 start: int = 0, seconds_per: bool = False, every: float | None = None, enabled: bool = True):
        self.label, self.total, self.unit, self.seconds_per = label, total, unit, seconds_per
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.first = self.done = start
        self.tokens = 0
        self.start = self._last = time.monotonic()
        self.lines = 0  # plain lines printed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = self._thread = None
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if (total is not None and total <= 0) or not enabled or verbosity.quiet():
            return
        if tty:
            self._bar = self._rich()
        else:
            self._thread = threading.Thread(target=self._tick, name="trcli-progress", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ terminal

    def _rich(self):
        if _Shared.bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar
            from rich.table import Column
            from rich.text import Text

            class Rate(ProgressColumn):
                def __init__(self):
                    super().__init__(table_column=Column(no_wrap=True))

                def render(self, task):
                    if task.speed is None:
                        return Text("-")
                    return Text(_rate(task.speed, task.fields["unit"], task.fields["seconds_per"]))

            class Shrinkable(ProgressColumn):
                """Tokens/s and the note (the loss ...): on a narrow terminal these are cut short, not the
                counts, the rate and the ETA."""

                def __init__(self, text):
                    self.text = text
                    super().__init__(table_column=Column(no_wrap=False, overflow="ellipsis"))

                def render(self, task):
                    return Text(self.text(task), no_wrap=True, overflow="ellipsis")

            def tokens(task) -> str:
                elapsed, count = task.elapsed or 0.0, task.fields["tokens"]
                return f"{count / elapsed:.0f} tokens/s" if count and elapsed > 0 else ""

            _Shared.bar = Bar(TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                              BarColumn(bar_width=20), MofNCompleteColumn(), Rate(), Shrinkable(tokens),
                              TimeElapsedColumn(), "ETA", TimeRemainingColumn(),
                              Shrinkable(lambda task: task.fields["note"]),
                              console=Console(file=self.stream, force_terminal=True), transient=True)
            _Shared.bar.start()
        _Shared.users += 1
        self._task = _Shared.bar.add_task(self.label, total=self.total, completed=self.done, unit=self.unit,
                                          seconds_per=self.seconds_per, tokens=0, note="")
        return _Shared.bar

    # ------------------------------------------------------------ plain lines

    def _tick(self) -> None:
        while True:
            every = PLAIN_EVERY if self.every is None else self.every
            if self._stop.wait(max(every - (time.monotonic() - self._last), 0.01)):
                return
            if time.monotonic() - self._last >= every:
                self._line()

    def _stats(self, elapsed: float) -> str:
        per_second = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        text = _rate(per_second, self.unit, self.seconds_per)
        if self.tokens:
            text += f", {self.tokens / elapsed if elapsed > 0 else 0.0:.0f} tokens/s"
        return text

    def _line(self, final: bool = False, note: str = "") -> None:
        with self._lock:
            now = time.monotonic()
            elapsed = now - self.start
            count = f"{self.done} {self.unit}" if self.total is None else f"{self.done}/{self.total} {self.unit}"
            if final:
                text = f"{self.label}: {count} in {duration(elapsed)}, {self._stats(elapsed)}"
            elif self.total is None:  # no share done, no ETA
                text = f"{self.label}: {count}, {self._stats(elapsed)}"
            else:
                per_second = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
                eta = duration((self.total - self.done) / per_second) if per_second > 0 else "unknown"
                text = f"{self.label}: {count} ({100 * self.done / self.total:.0f}%), {self._stats(elapsed)}, ETA {eta}"
            if note and not final:
                text += f", {note}"
            print(text, file=self.stream, flush=True)
            self.lines += 1
            self._last = now

    # ------------------------------------------------------------ both

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        with self._lock:
            self.done += n
            self.tokens += tokens
        if self._bar is not None:
            self._bar.update(self._task, advance=n, tokens=self.tokens)

    def show(self, note: str = "") -> None:
        """A plain line now (e.g. at a logging step), ending with ``note``; on a terminal the note
        goes into the bar's row (until the next one)."""
        if self._bar is not None:
            self._bar.update(self._task, note=note, refresh=True)
        elif self._thread is not None:
            self._line(note=note)

    def close(self, completed: bool = True) -> None:
        """Stop; in plain mode, end with a final line when any line was printed (not after an error)."""
        if self._bar is not None:
            _Shared.users -= 1
            if _Shared.users == 0:
                self._bar.stop()  # drawn once more as it ends, then cleared (transient)
                _Shared.bar = None
            else:
                self._bar.remove_task(self._task)
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
