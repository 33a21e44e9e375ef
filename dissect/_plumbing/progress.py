"""The one progress-bar policy of the library (tqdm, switched off by ``progress=False``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

DELAY_S = 1.0  # inner bars appear only for work that lasts longer than this


def progress_bar(
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    *,
    unit: str = "batch",
    iterable: Iterable[Any] | None = None,
    initial: int = 0,
    outer: bool = False,
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

    Returns
    -------
    tqdm.tqdm
        Use it as a context manager, or call ``close()``.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    tiny = total is not None and total < 2 and not outer
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                disable=not enabled or tiny, delay=0 if outer else DELAY_S, leave=outer)
