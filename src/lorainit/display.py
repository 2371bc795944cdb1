"""The one progress display of a long job (a sweep, a pack trained alone, the toy), on stderr.

Where stderr is a terminal it is tqdm's bar, redrawn in place. Anywhere else (stderr sent to a
file, a pipe, a CI log) a redrawn bar leaves carriage returns and half-lines behind, so it prints
plain lines instead, each whole and readable on its own: one when it starts, one at each milestone
its caller marks (a pack finished, a width trained), one when it closes, and in between at most
one a minute while work goes on. A line reads

    sweep: step 120/800 (15%), 2 min 10 s elapsed, about 12 min left | runs 4 trained, ... | pack 2/5 ...
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

LINE_EVERY_S = 60.0  # plain lines: at most one a minute between milestones


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressDisplay:
    """Work done of `total` in `unit`s, with a status text; a bar on a terminal, plain lines elsewhere.

    `enabled=False` shows nothing (`--quiet`). `initial` is work already done (a resumed pack): it
    counts toward the total but not toward the rate behind the time left. `stream` is stderr
    unless given; `clock` and `every` (seconds between plain lines) are there for tests.
    """

    def __init__(self, desc: str, total: float, unit: str = "step", initial: float = 0, status: str = "",
                 enabled: bool = True, unit_scale: bool = False, stream: TextIO | None = None,
                 every: float = LINE_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self.n, self.initial, self._total = initial, initial, total
        self.text = status
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.every, self.clock = every, clock
        self.bar = None
        self.closed = False
        self.started = self.last_line = clock()
        self.shown: tuple | None = None  # (n, total, text) of the last plain line
        if not enabled:
            return
        if _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                            file=self.stream, dynamic_ncols=True, postfix=status or None)
        else:
            self._line()

    @property
    def total(self) -> float:
        return self._total

    @total.setter
    def total(self, value: float) -> None:
        """The total corrected once it is known (a pack's steps, once its data are loaded)."""
        self._total = value
        if self.bar is not None:
            self.bar.total = value

    def update(self, n: float = 0, status: str | None = None) -> None:
        """Add `n` to the work done and, if given, replace the status text."""
        if self._advance(n, status) and self.clock() - self.last_line >= self.every:
            self._line()

    def mark(self, status: str | None = None, n: float = 0) -> None:
        """A milestone: add `n` to the work done, replace the status if given, and print a plain
        line now (a terminal's bar just redraws)."""
        if self._advance(n, status):
            self._line()

    def _advance(self, n: float, status: str | None) -> bool:
        """Count the work and the status; redraw a terminal's bar. True when plain lines are due instead."""
        if not self.enabled or self.closed:
            return False
        self.n += n
        if status is not None:
            self.text = status
        if self.bar is None:
            return True
        if status is not None:
            self.bar.set_postfix_str(status, refresh=False)
        if n:
            self.bar.update(n)
        else:
            self.bar.refresh()
        return False

    def close(self) -> None:
        """End the display: a terminal's bar stays drawn; elsewhere a last line if anything changed."""
        if not self.enabled or self.closed:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.shown != (self.n, self._total, self.text):
            self._line()
        self.closed = True

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, x: float) -> str:
        if self.unit_scale and x >= 1000:
            from tqdm import tqdm

            return tqdm.format_sizeof(x)  # 1.23M
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"

    def _line(self) -> None:
        now = self.clock()
        done, total = self.n, self._total
        percent = 100.0 * done / total if total else 100.0
        parts = [f"{self.desc}: {self.unit} {self._count(done)}/{self._count(total)} ({percent:.0f}%)",
                 f"{_duration(now - self.started)} elapsed"]
        if self.n > self.initial and done < total:  # the rate of this session's work
            parts.append(f"about {_duration((now - self.started) * (total - done) / (done - self.initial))} left")
        line = ", ".join(parts) + (f" | {self.text}" if self.text else "")
        print(line, file=self.stream, flush=True)
        self.last_line, self.shown = now, (done, total, self.text)
