"""Exact streaming statistics shared by the analyses: per-row top-k and exact quantiles.

Running statistics follow davidbau/netdissect's ``runningstats`` shape: ``add(batch)``,
``merge(other)``, ``result()``, ``state_dict()`` / ``load_state_dict()``, so a tally over a
dataset can be checkpointed, resumed and merged across processes. Nothing here approximates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import torch

from .errors import DissectError


class Collective(Protocol):
    """What a multi-process tally needs from its process group (see
    :class:`dissect.distributed.DistContext`): an exact element-wise sum over the ranks."""

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (every rank gets it; int64 stays exact)."""
        ...


class TopK:
    """The ``k`` largest values seen so far in each of ``rows`` independent streams.

    Parameters
    ----------
    rows
        Number of streams (e.g. units of a layer).
    k
        How many of the largest values to keep per stream.
    device
        Where the running values live.
    dtype
        Dtype of the kept values.
    """

    def __init__(
        self,
        rows: int,
        k: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if k < 1:
            raise DissectError(f"TopK needs k >= 1, got {k}")
        self.rows, self.k = rows, k
        self.values = torch.empty(rows, 0, device=device, dtype=dtype)
        self._pending: list[torch.Tensor] = []
        self._pending_cols = 0
        self.count = 0

    def _compact(self) -> None:
        if self._pending:
            both = torch.cat([self.values, *self._pending], dim=1)
            self._pending, self._pending_cols = [], 0
            if both.shape[1] > self.k:
                both = both.topk(self.k, dim=1, sorted=False).values
            self.values = both

    def add(self, batch: torch.Tensor) -> None:
        """Add ``(rows, n)`` new values (one column per observation).

        Batches are buffered and reduced once the buffer holds ``k`` columns, so the cost is
        amortized over the stream rather than paid per batch.
        """
        if batch.ndim != 2 or batch.shape[0] != self.rows:
            raise DissectError(f"TopK.add expects ({self.rows}, n), got {tuple(batch.shape)}")
        self.count += batch.shape[1]
        self._pending.append(batch.to(self.values))
        self._pending_cols += batch.shape[1]
        if self._pending_cols >= max(self.k, 1024):
            self._compact()

    def merge(self, other: TopK) -> None:
        """Fold another tally of the same streams into this one."""
        other._compact()
        count = self.count + other.count
        self.add(other.values)
        self.count = count

    def result(self) -> torch.Tensor:
        """``(rows, min(k, count))`` kept values, largest first."""
        self._compact()
        return self.values.sort(dim=1, descending=True).values

    def to_(self, device: str | torch.device) -> TopK:
        """Move the running values in place; returns ``self``."""
        self._compact()
        self.values = self.values.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the tally."""
        self._compact()
        return {"rows": self.rows, "k": self.k, "count": self.count, "values": self.values.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a tally saved by :meth:`state_dict`."""
        self.rows, self.k, self.count = int(state["rows"]), int(state["k"]), int(state["count"])
        self.values = state["values"].to(self.values.device, self.values.dtype)


def quantile_ranks(n: int, level: float) -> tuple[int, int, float]:
    """Where numpy's linear ``quantile(values, level)`` looks in the sorted values.

    Parameters
    ----------
    n
        Number of values.
    level
        The quantile level in [0, 1].

    Returns
    -------
    lo, hi, gamma
        Ascending ranks of the two order statistics and the interpolation weight, exactly as
        ``numpy.quantile(..., method="linear")`` computes them.
    """
    if n < 1:
        raise DissectError("a quantile of no values is undefined")
    if not 0.0 <= level <= 1.0:
        raise DissectError(f"quantile level must be in [0, 1], got {level}")
    virtual = (n - 1) * np.float64(level)
    lo = int(math.floor(virtual))
    gamma = float(virtual - lo)
    lo = min(max(lo, 0), n - 1)
    return lo, min(lo + 1, n - 1), gamma


def lerp_like_numpy(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's quantile interpolation between order statistics ``a <= b``, bit for bit.

    ``numpy.quantile`` computes ``a + (b - a) * g`` for ``g < 0.5`` and
    ``b - (b - a) * (1 - g)`` otherwise, in the values' dtype.
    """
    a, b = np.asarray(a), np.asarray(b)
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


def exact_quantiles(
    batches: Callable[[], Iterable[torch.Tensor]],
    rows: int,
    n: int,
    level: float,
    *,
    dtype: np.dtype | str = "float32",
    memory_values: int = 64_000_000,
    device: str | torch.device = "cpu",
    collective: Collective | None = None,
) -> np.ndarray:
    """Exact ``numpy.quantile(values[r], level)`` of every row over a stream of batches.

    The values of row ``r`` are all columns of all batches; ``batches()`` is called for each
    pass and must yield the same ``(rows, m_i)`` tensors each time. For the high levels
    Network Dissection uses (0.995) one pass keeping each row's top values suffices; when those
    would exceed ``memory_values`` values in total, a radix selection over the values'
    32-bit keys finds the two order statistics in three passes with ``rows * 2048`` counters
    (bounded memory, still exact, ties included). NaNs are not supported.

    Across processes (``collective``), each rank streams its own part of the values and
    ``n`` counts all ranks' values. Each rank keeps its own ``k`` largest values per row; the
    order statistics of the union are then found by a 16-way search over the 32-bit keys,
    summing the ranks' counts of kept values above each probe (8 all-reduces of
    ``(2, rows, 15)`` int64, see :func:`_merged_order_stats`); the radix path sums the ranks'
    digit histograms before choosing each digit. Both select the same order statistics as one
    process, so the result is bit for bit the same, and no rank ever holds another rank's
    values.

    Parameters
    ----------
    batches
        Returns a fresh iterable of ``(rows, m)`` tensors (values in their stored dtype).
    rows, n
        Number of rows and of values per row in total.
    level
        Quantile level (``1 - quantile`` in NetDissect's terms).
    dtype
        The values' numpy dtype; the result has it (as numpy's would).
    memory_values
        Bound on the number of values held at once.
    device
        Where the selection runs.
    collective
        The process group of a multi-process run (every rank calls this together), or
        ``None``.

    Returns
    -------
    numpy.ndarray
        ``(rows,)`` quantiles, equal to ``numpy.quantile`` on the full data.
    """
    lo, hi, gamma = quantile_ranks(n, level)
    k = n - lo  # the order statistics lo and hi are among the k largest
    if rows * k <= memory_values:
        top = TopK(rows, k, device=device, dtype=torch.float32)
        for batch in batches():
            top.add(batch.to(device, torch.float32))
        ranked = top.result()  # descending: ascending rank r is column n - 1 - r
        if collective is not None:  # ascending rank r: n - r values are >= it
            a, b = _merged_order_stats(ranked, (n - lo, n - hi), collective)
            return lerp_like_numpy(a.astype(dtype), b.astype(dtype), gamma)
        a = ranked[:, n - 1 - lo].cpu().numpy().astype(dtype)
        b = ranked[:, n - 1 - hi].cpu().numpy().astype(dtype)
        return lerp_like_numpy(a, b, gamma)
    a, b = _radix_order_stats(batches, rows, (lo, hi), device, collective)
    return lerp_like_numpy(a.astype(dtype), b.astype(dtype), gamma)


MERGE_BITS = 4  # key bits settled per all-reduce when merging the ranks' top values


def _merged_order_stats(
    top: torch.Tensor, counts: tuple[int, ...], collective: Collective
) -> tuple[np.ndarray, ...]:
    """Order statistics of the union of all ranks' values from each rank's largest values.

    ``top`` holds this rank's ``m`` largest values of each row (all of them when it has fewer
    than ``k``, where ``k >= max(counts)``). For each ``c`` in ``counts`` the result is the
    ``c``-th largest value of the union: the largest key ``t`` with at least ``c`` values
    ``>= t`` over all ranks, found by a ``2**MERGE_BITS``-way search on the 32-bit keys (each
    round splits the remaining key interval into 16 and keeps the part holding ``t``). A
    rank's count of its kept values ``>= t`` is exact when below ``k``; when it is ``k`` the
    rank's true count is at least ``k >= c``, so the summed counts decide every probe exactly
    as the full data would (ties included).
    """
    device = top.device
    keys = sortable_keys(top).sort(dim=1).values  # ascending, (rows, m)
    rows, m = keys.shape
    stats = len(counts)
    ways = 1 << MERGE_BITS
    need = torch.tensor(counts, dtype=torch.int64, device=device)[:, None, None]
    steps = torch.arange(1, ways, dtype=torch.int64, device=device)
    low = torch.zeros(stats, rows, dtype=torch.int64, device=device)  # at least c values >= low
    width = 1 << 32  # ... and fewer than c values >= low + width
    for _ in range(32 // MERGE_BITS):
        width >>= MERGE_BITS
        probes = low[:, :, None] + width * steps  # (stats, rows, ways - 1), ascending
        if m:
            flat = probes.permute(1, 0, 2).reshape(rows, -1).contiguous()
            below = torch.searchsorted(keys, flat).view(rows, stats, ways - 1)
            local = (m - below).permute(1, 0, 2).contiguous()
        else:
            local = torch.zeros_like(probes)
        ok = collective.all_sum(local) >= need  # true for a prefix of the probes
        low = low + width * ok.sum(dim=2)
    return tuple(key_to_float(low[i].cpu().numpy()) for i in range(stats))


RADIX_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of a 32-bit key, high first


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2**32) with the same order (NaN excluded)."""
    bits = values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    flipped = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse order
    return flipped + (1 << 31)


def key_to_float(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`sortable_keys`."""
    signed = keys.astype(np.int64) - (1 << 31)
    bits = np.where(signed < 0, signed ^ 0x7FFFFFFF, signed).astype(np.int32)
    return bits.view(np.float32)


def _radix_order_stats(
    batches: Callable[[], Iterable[torch.Tensor]],
    rows: int,
    ranks: tuple[int, int],
    device: str | torch.device,
    collective: Collective | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Order statistics at ascending ``ranks`` of each row by radix selection (3 passes).

    Each pass histograms the next digit of the values' order-preserving 32-bit keys among the
    values whose higher digits match the prefix found so far; memory is ``rows * 2048`` counts
    per rank, whatever the data size. Exact, including ties. With ``collective`` the
    histograms of all processes are summed (exact int64) before each digit is chosen.
    """
    row_ids = torch.arange(rows, device=device)
    results = []
    for rank in ranks:
        prefix = torch.zeros(rows, dtype=torch.int64, device=device)  # high digits found so far
        below = torch.zeros(rows, dtype=torch.int64, device=device)  # values under the prefix
        for level, (shift, bits) in enumerate(RADIX_DIGITS):
            size = 1 << bits
            counts = torch.zeros(rows * size, dtype=torch.int64, device=device)
            for batch in batches():
                keys = sortable_keys(batch.to(device))
                if level == 0:
                    match = torch.ones_like(keys, dtype=torch.bool)
                else:
                    high_shift = shift + bits
                    match = (keys >> high_shift) == prefix[:, None]
                digit = (keys >> shift) & (size - 1)
                flat = (row_ids[:, None] * size + digit)[match]
                counts += torch.bincount(flat, minlength=rows * size)
            if collective is not None:
                counts = collective.all_sum(counts)
            cum = below[:, None] + counts.view(rows, size).cumsum(dim=1)
            target = torch.full((rows, 1), rank, dtype=torch.int64, device=device)
            chosen = torch.searchsorted(cum, target, right=True)[:, 0]
            before = torch.where(
                chosen > 0, cum.gather(1, (chosen - 1).clamp(min=0)[:, None])[:, 0], below
            )
            below = before
            prefix = (prefix << bits) | chosen
        results.append(key_to_float(prefix.cpu().numpy()))
    return results[0], results[1]
