"""The one progress-bar policy of the library (tqdm, switched off by ``progress=False``).

On a terminal a bar redraws itself in place. When stderr is not a terminal (CI logs, ``nohup``,
a pipe) redrawn frames would pile up as kilobytes of carriage returns, so bars print plain short
lines instead: one when a top-level stage starts, one when it ends, and in between a percentage
at most every :data:`PLAIN_INTERVAL_S` seconds.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

DELAY_S = 1.0  # inner bars appear only for work that lasts longer than this
PLAIN_INTERVAL_S = 5.0  # without a terminal: at most one progress line per bar this often
PLAIN_FORMAT = "{desc}: {percentage:3.0f}% ({n_fmt}/{total_fmt} {unit}) [{elapsed}<{remaining}]"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}]"
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A file for tqdm that turns redrawn frames into whole lines on stderr.

    Carriage returns, cursor movements and blank clears are dropped; each remaining frame is
    one line, and a frame equal to the last one written is not repeated.
    """

    def __init__(self) -> None:
        self.last = ""

    def write(self, text: str) -> None:
        line = _ESCAPE.sub("", str(text)).replace("\r", "").strip()
        if line and line != self.last:
            self.last = line
            sys.stderr.write(line + "\n")  # looked up now: a redirected stderr is followed

    def flush(self) -> None:
        getattr(sys.stderr, "flush", lambda: None)()


class PlainBar(std_tqdm):
    """A tqdm bar for a stderr that is not a terminal: plain lines, no redrawing."""

    def moveto(self, n: int) -> None:  # nested bars would move the cursor: print in order
        return

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool:
        """Print a line, unless one was printed less than ``mininterval`` seconds ago
        (``set_postfix`` and ``set_description`` refresh too) or the bar's delay is not over."""
        now = self._time()
        last = getattr(self, "_plain_last", None)
        if now < getattr(self, "start_t", now) + self.delay or (last is not None
                                                and now - last < self.mininterval):
            return False
        self._plain_last = now
        return super().refresh(nolock=nolock, lock_args=lock_args)


def is_terminal() -> bool:
    """Whether stderr, where bars go, is a terminal (redrawn bars) or not (plain lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    *,
    unit: str = "batch",
    iterable: Iterable[Any] | None = None,
    initial: int = 0,
    outer: bool = False,
    unit_scale: bool = False,
) -> tqdm:
    """A tqdm bar for a long loop.

    Parameters
    ----------
    total
        Steps of the loop (``None``: ``len(iterable)`` when it has one).
    desc
        What the loop does, shown before the bar.
    enabled
        The analysis's ``progress=`` argument; ``False`` disables the bar.
    unit
        What a step is (``"batch"``, ``"img"``, ``"step"``).
    iterable
        Iterate over this through the bar.
    initial
        Steps already done (a resumed run).
    outer
        A top-level stage (capture, counting) that the user waits for: shown at once and left
        on screen. Inner loops (``outer=False``) appear only after :data:`DELAY_S` seconds and
        are cleared when done, and a loop of fewer than 2 steps shows none.
    unit_scale
        Show counts with binary prefixes (``233k/1.2G B``): for byte counts.

    Returns
    -------
    tqdm.tqdm
        Use it as a context manager, or call ``close()``. When stderr is not a terminal it is
        a :class:`PlainBar`: a line when an outer stage starts and ends, and a percentage at
        most every :data:`PLAIN_INTERVAL_S` seconds (inner loops: only those that last longer
        than that, and no closing line).
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    tiny = total is not None and total < 2 and not outer
    disable = not enabled or tiny
    scale = {"unit_scale": unit_scale, "unit_divisor": 1024 if unit_scale else 1000}
    if disable or is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                    disable=disable, delay=0 if outer else DELAY_S, leave=outer, **scale)
    return PlainBar(iterable, total=total, desc=desc or "progress", unit=unit, initial=initial,
                    **scale,
                    file=_Lines(), leave=outer, delay=0 if outer else PLAIN_INTERVAL_S,
                    mininterval=PLAIN_INTERVAL_S, maxinterval=max(PLAIN_INTERVAL_S, 10.0),
                    ascii=True, dynamic_ncols=False, ncols=None,
                    bar_format=PLAIN_FORMAT if total is not None else PLAIN_FORMAT_NO_TOTAL)
