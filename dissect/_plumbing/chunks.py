"""Row chunks: how the analyses bound the rows of one forward pass."""

from __future__ import annotations


def row_chunks(rows: int, batch_size: int | None) -> list[tuple[int, int]]:
    """Split ``rows`` rows into ``[start, stop)`` chunks of at most ``batch_size`` rows.

    Parameters
    ----------
    rows
        How many rows.
    batch_size
        The largest chunk; ``None`` for one chunk of every row.

    Returns
    -------
    list of (int, int)
        Empty when ``rows`` is 0.
    """
    size = rows if batch_size is None else batch_size
    return [(start, min(start + size, rows)) for start in range(0, rows, max(1, size))]
