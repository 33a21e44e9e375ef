"""Exact streaming statistics shared by the analyses: per-row top-k and exact quantiles.

Running statistics follow davidbau/netdissect's ``runningstats`` shape: ``add(batch)``,
``merge(other)``, ``result()``, ``state_dict()`` / ``load_state_dict()``, so a tally over a
dataset can be checkpointed, resumed and merged across processes. Nothing here approximates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import torch

from .errors import DissectError

log = logging.getLogger(__name__)


class Collective(Protocol):
    """What a multi-process tally needs from its process group (see
    :class:`dissect.distributed.DistContext`): an exact element-wise sum over the ranks."""

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (every rank gets it; int64 stays exact)."""
        ...


class TopK:
    """The ``k`` largest values seen so far in each of ``rows`` independent streams.

    The values live, negated, in one ``(rows, k + max(k // 4, 1024))`` buffer: new values are
    copied into its free columns and, once it is full, each row is partitioned in place so
    that its ``k`` largest values come first. On the CPU (float16/32/64) numpy partitions in
    place and filters the batches through one reused scratch block: no index tensor, no
    concatenated copy, no allocation per batch; elsewhere ``torch.topk`` does it. Memory: the
    buffer plus about 1M values. Non-finite values are not expected (:func:`exact_quantiles`
    replaces them by ``-inf`` first): where a NaN ranks is unspecified.

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

    def __init__(self, rows: int, k: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if k < 1:
            raise DissectError(f"TopK needs k >= 1, got {k}")
        self.rows, self.k, self.count = rows, k, 0
        self._set(torch.empty(rows, 0, device=device, dtype=dtype))
        self._scratch: np.ndarray | None = None  # the CPU filter's work block

    def _set(self, values: torch.Tensor) -> None:
        self._buf, self._fill = values.neg(), values.shape[1]  # the values negated; in use
        self._floor: torch.Tensor | None = None  # (rows, 1): the k-th largest value kept
        self._host = values.device.type == "cpu" and values.dtype in _NUMPY_FLOATS

    @property
    def values(self) -> torch.Tensor:
        """``(rows, min(k, count))`` the values kept so far, in no particular order (a copy)."""
        self._compact()
        return self._buf[:, : self._fill].neg()

    def _compact(self) -> None:
        """Move each row's ``k`` largest values to the buffer's first ``k`` columns."""
        k, live = self.k, self._buf[:, : self._fill]
        if self._fill > k:
            if self._host:
                live.numpy().partition(k - 1, axis=1)  # in place: the k smallest negated first
            else:
                live[:, :k] = live.topk(k, dim=1, largest=False, sorted=False).values
            self._fill, self._floor = k, None
        if self._fill == k and self._floor is None:  # nothing at or below it can enter
            self._floor = self._buf[:, :k].amax(dim=1, keepdim=True).neg_()

    def _append(self, values: torch.Tensor | np.ndarray, negated: bool = False) -> None:
        """Copy ``(rows, m)`` values into the buffer, compacting it whenever it is full."""
        at, width = 0, self._buf.shape[1]
        while at < values.shape[1]:
            if self._fill == width:
                self._compact()
            take = min(width - self._fill, values.shape[1] - at)
            src, dst = values[:, at : at + take], self._buf[:, self._fill : self._fill + take]
            if isinstance(src, np.ndarray):
                np.copyto(dst.numpy(), src) if negated else np.negative(src, out=dst.numpy())
            else:
                dst.copy_(src) if negated else torch.neg(src, out=dst)
            self._fill, at = self._fill + take, at + take

    def add(self, batch: torch.Tensor) -> None:
        """Add ``(rows, n)`` new values (one column per observation).

        Once ``k`` values per row are kept, a batch's values at or below each row's ``k``-th
        largest so far are dropped on arrival (they cannot change the kept multiset; ties
        included): the batch is filtered in pieces of about 1M values, each reduced to as
        many columns as its row with the most candidates needs.
        """
        if batch.ndim != 2 or batch.shape[0] != self.rows:
            raise DissectError(f"TopK.add expects ({self.rows}, n), got {tuple(batch.shape)}")
        self.count += batch.shape[1]
        width, step = self.k + max(self.k // 4, 1024), max(64, (1 << 20) // max(1, self.rows))
        if self._buf.shape[1] < width:  # on the CPU, its pages are touched as columns fill
            buf = self._buf.new_empty(self.rows, width)
            buf[:, : self._fill] = self._buf[:, : self._fill]
            self._buf = buf
        if self._host and (self._scratch is None or self._scratch.shape[1] < step):
            self._scratch = np.empty((self.rows, step), dtype=self._buf.numpy().dtype)
        for piece in batch.to(self._buf.device, self._buf.dtype).split(step, dim=1):
            if self._floor is None:
                self._append(piece)
            elif self._host:
                self._filter_host(piece.numpy(), self._floor.numpy())
            else:
                keep = piece > self._floor
                most = int(keep.sum(dim=1).max())
                if 2 * most < piece.shape[1]:  # the candidates of every row, as few columns
                    piece = piece.masked_fill(~keep, -math.inf).topk(most, dim=1,
                                                                     sorted=False).values
                self._append(piece)

    def _filter_host(self, piece: np.ndarray, floor: np.ndarray) -> None:
        """Append the values of ``piece`` above ``floor``, each row's first, as few columns."""
        mask = piece > floor
        most = int(np.count_nonzero(mask, axis=1).max())
        if 2 * most >= piece.shape[1]:
            self._append(piece)
        elif most:
            work = self._scratch[:, : piece.shape[1]]
            np.negative(piece, out=work)
            np.copyto(work, np.inf, where=np.logical_not(mask, out=mask))
            work.partition(most - 1, axis=1)  # each row's candidates first, then +inf
            self._append(work[:, :most], negated=True)

    def merge(self, other: TopK) -> None:
        """Fold another tally of the same streams into this one."""
        count = self.count + other.count
        self.add(other.values)
        self.count = count

    def _ascending_negated(self) -> torch.Tensor:
        """The kept values negated, rows ascending: the buffer, sorted in place."""
        self._compact()
        live = self._buf[:, : self._fill]
        if self._host:
            live.numpy().sort(axis=1)
        else:
            live.copy_(live.sort(dim=1).values)
        return live

    def result(self) -> torch.Tensor:
        """``(rows, min(k, count))`` kept values, largest first."""
        return self._ascending_negated().neg()

    def to_(self, device: str | torch.device) -> TopK:
        """Move the running values in place; returns ``self``."""
        self._set(self.values.to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the tally."""
        return {"rows": self.rows, "k": self.k, "count": self.count, "values": self.values.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a tally saved by :meth:`state_dict`."""
        self.rows, self.k, self.count = int(state["rows"]), int(state["k"]), int(state["count"])
        self._set(state["values"].to(self._buf.device, self._buf.dtype))


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # TopK sorts these in numpy


def top_rows(read: Callable[[int, int], np.ndarray], n: int, units: int, k: int, *,
             chunk_rows: int | None = None) -> np.ndarray:
    """Each column's ``k`` largest rows of an ``(n, U)`` array read in chunks: memory is
    bounded by a chunk, not by ``n``.

    Equals ``np.argsort(-v, axis=0, kind="stable")[:k].T`` with ``v`` the whole array and its
    non-finite values (NaN, ``+inf``, ``-inf``) replaced by ``-inf``: largest first, ties (and
    the non-finite values, which rank last) by the lower row.

    Parameters
    ----------
    read
        ``read(start, stop)`` returns rows ``[start, stop)`` as a ``(stop - start, U)`` array.
    n, units
        Number of rows and of columns ``U``.
    k
        How many rows to keep per column (at most ``n``).
    chunk_rows
        Rows per read (default: about 512K values per chunk: faster than larger chunks, and
        their few temporaries stay small).

    Returns
    -------
    numpy.ndarray
        ``(U, min(k, n))`` int64 row numbers, best first.
    """
    k = min(k, n)
    chunk_rows = chunk_rows or max(1, (1 << 19) // max(1, units))
    best_v: np.ndarray | None = None  # (k', U) kept values, rows ascending in each column
    best_r: np.ndarray | None = None
    start = 0
    while start < n:
        block = np.asarray(read(start, min(n, start + chunk_rows)), dtype=np.float64)
        block = np.where(np.isfinite(block), block, -np.inf)
        rows = np.broadcast_to(np.arange(start, start + len(block))[:, None], block.shape)
        start += len(block)
        if best_v is not None:  # earlier rows first: rows stay ascending in every column
            block = np.concatenate([best_v, block])
            rows = np.concatenate([best_r, rows])
        if len(block) <= k:
            best_v, best_r = block, np.ascontiguousarray(rows)
            continue
        # the k-th largest value t of each column: keep every value above t, then the values
        # equal to t in row order until k are kept (the lowest rows win ties, as argsort's)
        t = -np.partition(-block, k - 1, axis=0)[k - 1]
        above = block > t
        tied = block == t
        room = k - above.sum(axis=0)
        keep = above | (tied & (np.cumsum(tied, axis=0) <= room))
        col, pos = np.nonzero(keep.T)  # column-major: each column's kept rows ascending
        pos = pos.reshape(units, k).T
        best_v = np.take_along_axis(block, pos, axis=0)
        best_r = np.take_along_axis(rows, pos, axis=0)
    if best_v is None:
        return np.zeros((units, 0), dtype=np.int64)
    order = np.argsort(-best_v, axis=0, kind="stable")  # ties keep the ascending rows
    return np.take_along_axis(best_r, order, axis=0).T.astype(np.int64)


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
    return_nonfinite: bool = False,
    on_nonfinite: Callable[[int, torch.Tensor], None] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact quantile of every row's finite values over a stream of batches.

    The values of row ``r`` are all columns of all batches; ``batches()`` is called for each
    pass and must yield the same ``(rows, m_i)`` tensors each time. Non-finite values (NaN,
    ``+inf``, ``-inf``) are left out: the result is the quantile of the row's finite values,
    equal to ``numpy.nanquantile(np.where(np.isfinite(v), v, np.nan), level)`` (numpy's
    default ``"linear"`` method; ``numpy.quantile(v, level)`` when every value is finite), bit
    for bit. A row with no finite value at all gets ``+inf``: nothing exceeds it, so a
    threshold taken from it marks nothing active. Such rows, and every non-finite value, are
    counted; without ``return_nonfinite`` a warning says how many there were (with it, saying
    so is the caller's job).

    For the high levels Network Dissection uses (0.995) one pass keeping each row's top values
    suffices; when those would exceed ``memory_values`` values in total, a radix selection over
    the values' 32-bit keys finds the two order statistics in three passes with
    ``rows * 4096`` counters (bounded memory, still exact, ties included).

    Non-finite values cost nothing on finite data: the top-values path checks one sum per batch
    (a NaN or an infinity makes it non-finite; only then are the rows' sums and values
    examined, and the non-finite ones replaced by ``-inf``, below every kept value that can
    matter); the radix path finds them in its first histogram, where they fall in digits no
    finite value has, and leaves them out of the selection.

    Across processes (``collective``), each rank streams its own part of the values and
    ``n`` counts all ranks' values. Each rank keeps its own ``k`` largest values per row; the
    order statistics of the union are then found by a 16-way search over the 32-bit keys,
    summing the ranks' counts of kept values above each probe (8 all-reduces of
    ``(2, rows, 15)`` int64, see :func:`_merged_order_stats`; one more sums the non-finite
    counts); the radix path sums the ranks' digit histograms before choosing each digit. Both
    select the same order statistics as one process, so the result is bit for bit the same,
    and no rank ever holds another rank's values.

    Parameters
    ----------
    batches
        Returns a fresh iterable of ``(rows, m)`` tensors (values in their stored dtype).
    rows, n
        Number of rows and of values per row in total (non-finite ones included).
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
    return_nonfinite
        Also return the number of non-finite values of each row (over all ranks).
    on_nonfinite
        Called during the first pass as ``on_nonfinite(i, batch)`` for each batch ``i`` (0, 1,
        ... in the order ``batches()`` yields them) that holds a non-finite value, with that
        batch as yielded (as float32, on ``device``), e.g. to find out where the values came
        from without a check of one's own (it may also be called for a batch of finite values
        whose sum overflows). Only this rank's batches.

    Returns
    -------
    numpy.ndarray
        ``(rows,)`` quantiles of the finite values (``+inf`` for a row without one).
    numpy.ndarray
        Only with ``return_nonfinite``: ``(rows,)`` int64 counts of non-finite values.
    """
    lo, _, _ = quantile_ranks(n, level)
    k = n - lo  # the order statistics lo and hi (of f <= n finite values) are among the k
    # largest: f - floor((f - 1) * level) grows with f
    if rows * k <= memory_values:
        top = TopK(rows, k, device=device, dtype=torch.float32)
        bad = torch.zeros(rows, dtype=torch.int64, device=device)
        for i, batch in enumerate(batches()):
            batch = batch.to(device, torch.float32)
            top.add(_exclude_nonfinite(batch, bad, on_nonfinite, i))
        negated = top._ascending_negated()  # largest first, negated; non-finite: +inf
        if collective is not None:
            bad = collective.all_sum(bad)
        bad_np = bad.cpu().numpy().astype(np.int64)
        lo_r, hi_r = _finite_ranks(n - bad_np, level)
        finite = n - bad_np
        if collective is not None:  # ascending rank r of f finite values: the (f - r)-th
            counts = np.stack([finite - lo_r, finite - hi_r])  # largest of the union
            a, b = _merged_order_stats(negated.neg(), counts, collective)
        else:  # ascending rank r of a row's f finite values: column f - 1 - r (descending)
            if top.count != n:
                raise DissectError(f"exact_quantiles: the batches hold {top.count} values per "
                                   f"row, not n={n}")
            cols = np.stack([finite - 1 - lo_r, finite - 1 - hi_r], axis=1)
            cols = torch.from_numpy(np.maximum(cols, 0)).to(negated.device)  # -1: no finite
            picked = negated.gather(1, cols).neg_().cpu().numpy()
            a, b = picked[:, 0], picked[:, 1]
    else:
        a, b, bad_np = _radix_order_stats(batches, rows, n, level, device, collective,
                                          on_nonfinite)
    out = _interpolate(a, b, n - bad_np, level, np.dtype(dtype))
    if return_nonfinite:
        return out, bad_np
    if bad_np.any():
        empty = np.flatnonzero(bad_np == n)
        log.warning(
            "exact_quantiles: %d non-finite values in %d of %d rows were left out (quantiles "
            "of the finite values)%s", int(bad_np.sum()), int(np.count_nonzero(bad_np)), rows,
            (f"; row {_listing(empty)} has no finite value: its quantile is +inf"
             if len(empty) == 1 else
             f"; rows {_listing(empty)} have no finite value: their quantile is +inf"
             if len(empty) else ""))
    return out


def _listing(items: np.ndarray, most: int = 5) -> str:
    """``"3, 17, 20"``, or ``"3, 17, 20, 21, 22 and 7 more"``."""
    shown = ", ".join(str(int(i)) for i in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _exclude_nonfinite(batch: torch.Tensor, bad: torch.Tensor,
                       on_nonfinite: Callable[[int, torch.Tensor], None] | None = None,
                       i: int = 0) -> torch.Tensor:
    """``batch`` with its non-finite values replaced by ``-inf`` (a copy when there are any),
    adding each row's count of them to ``bad`` (and calling ``on_nonfinite(i, batch)``).

    One sum finds the batches that may hold one (a NaN or an infinity makes the sum non-finite;
    so may a finite overflow, which the exact check below then clears): on finite data that is
    the whole cost. Then one sum per row finds the rows to examine.
    """
    if batch.numel() == 0 or bool(torch.isfinite(batch.sum())):
        return batch
    suspect = ~torch.isfinite(batch.sum(dim=1))
    if not bool(suspect.any()):
        return batch
    idx = torch.nonzero(suspect).squeeze(1)
    sub = batch.index_select(0, idx)
    mask = ~torch.isfinite(sub)
    counts = mask.sum(dim=1)
    if on_nonfinite is not None and bool(counts.any()):
        on_nonfinite(i, batch)
    bad.index_add_(0, idx, counts)
    return batch.index_copy(0, idx, sub.masked_fill_(mask, -math.inf))


def _finite_ranks(finite: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ascending ranks ``lo, hi`` of :func:`quantile_ranks` among its ``finite``
    values (``0, 0`` for a row without any)."""
    lo = np.zeros(len(finite), dtype=np.int64)
    hi = np.zeros(len(finite), dtype=np.int64)
    for f in np.unique(finite[finite > 0]):
        rows = finite == f
        lo[rows], hi[rows], _ = quantile_ranks(int(f), level)
    return lo, hi


def _interpolate(a: np.ndarray, b: np.ndarray, finite: np.ndarray, level: float,
                 dtype: np.dtype) -> np.ndarray:
    """numpy's linear interpolation between each row's order statistics ``a <= b``, with the
    weight of its own number of ``finite`` values (``+inf`` where there are none)."""
    out = np.full(len(finite), np.inf, dtype=dtype)
    for f in np.unique(finite[finite > 0]):  # one group when every value is finite
        rows = finite == f
        _, _, gamma = quantile_ranks(int(f), level)
        out[rows] = lerp_like_numpy(np.asarray(a)[rows].astype(dtype),
                                    np.asarray(b)[rows].astype(dtype), gamma)
    return out


MERGE_BITS = 4  # key bits settled per all-reduce when merging the ranks' top values


def _merged_order_stats(
    top: torch.Tensor, counts: np.ndarray, collective: Collective
) -> tuple[np.ndarray, ...]:
    """Order statistics of the union of all ranks' values from each rank's largest values.

    ``top`` holds this rank's ``m`` largest values of each row (all of them when it has fewer
    than ``k``, where ``k >= counts.max()``). ``counts`` is ``(stats, rows)``: for each
    ``c = counts[i, r]`` the result's ``i``-th array holds, for row ``r``, the ``c``-th
    largest value of the union: the largest key ``t`` with at least ``c`` values ``>= t``
    over all ranks, found by a ``2**MERGE_BITS``-way search on the 32-bit keys (each round
    splits the remaining key interval into 16 and keeps the part holding ``t``). A rank's
    count of its kept values ``>= t`` is exact when below ``k``; when it is ``k`` the rank's
    true count is at least ``k >= c``, so the summed counts decide every probe exactly as the
    full data would (ties included). Non-finite values kept as ``-inf`` (see
    :func:`exact_quantiles`) sit below every ``c``-th largest finite value and change no count
    that matters.
    """
    device = top.device
    keys = sortable_keys(top).sort(dim=1).values  # ascending, (rows, m)
    rows, m = keys.shape
    stats = len(counts)
    ways = 1 << MERGE_BITS
    need = torch.as_tensor(np.asarray(counts, dtype=np.int64), device=device)[:, :, None]
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
# top digits (key >> 21) of the non-finite values: [0, 4) holds -inf (3) and NaNs with the
# sign bit set, [2044, 2048) +inf (2044) and the other NaNs; every finite float32 lies in
# [4, 2044) (-FLT_MAX: key 0x00800000, FLT_MAX: 0xFF7FFFFF)
NONFINITE_TOP_DIGITS = (4, 2044)


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2**32) with the same order (NaN excluded: its
    keys lie above ``+inf``'s, or below ``-inf``'s when its sign bit is set)."""
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
    n: int,
    level: float,
    device: str | torch.device,
    collective: Collective | None = None,
    on_nonfinite: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two order statistics of :func:`quantile_ranks` of each row's finite values by radix
    selection (three passes), and each row's number of non-finite values.

    Each pass histograms the next digit of the values' order-preserving 32-bit keys among the
    values whose higher digits match the prefix found so far. Both order statistics come from
    the same three passes over the data, with one ``bincount`` per batch: a single histogram
    while their higher digits agree in every row (always for the first digit, usually for all),
    else one of twice the bins, the second statistic's after the first's. Memory is ``rows *
    4096`` counts per rank, whatever the data size. Exact, including ties. Non-finite values
    have top digits no finite value has (:data:`NONFINITE_TOP_DIGITS`): the first histogram
    counts them and then drops them, so the ranks are taken among each row's finite values and
    no later digit can match them. With ``collective`` the histograms of all processes are
    summed (exact int64) before each digit is chosen. ``on_nonfinite`` (see
    :func:`exact_quantiles`) costs one sum per batch of the first pass.
    """
    row_ids = torch.arange(rows, device=device)
    stats = 2
    prefix = torch.zeros(stats, rows, dtype=torch.int64, device=device)  # high digits so far
    below = torch.zeros(stats, rows, dtype=torch.int64, device=device)  # values under prefix
    target = below
    bad = np.zeros(rows, dtype=np.int64)
    for depth, (shift, bits) in enumerate(RADIX_DIGITS):
        size = 1 << bits
        # the first digit's histogram serves both statistics, and so does any later one
        # while both have the same higher digits in every row (the usual case)
        same = depth == 0 or bool(torch.equal(prefix[0], prefix[1]))
        parts = 1 if same else stats
        counts = torch.zeros(parts * rows * size, dtype=torch.int64, device=device)
        for i, batch in enumerate(batches()):
            batch = batch.to(device, torch.float32)
            keys = sortable_keys(batch)
            flat = row_ids[:, None] * size + ((keys >> shift) & (size - 1))
            if depth == 0:
                counts += torch.bincount(flat.reshape(-1), minlength=rows * size)
                if on_nonfinite is not None and not bool(torch.isfinite(batch.sum())):
                    on_nonfinite(i, batch)
                continue
            high = keys >> (shift + bits)
            if same:  # one histogram serves both order statistics
                counts[: rows * size] += torch.bincount(flat[high == prefix[0, :, None]],
                                                        minlength=rows * size)
            else:  # both in one bincount: the second statistic's bins follow the first's
                picked = torch.cat([flat[high == prefix[0, :, None]],
                                    flat[high == prefix[1, :, None]] + rows * size])
                counts += torch.bincount(picked, minlength=stats * rows * size)
        if collective is not None:
            counts = collective.all_sum(counts)
        counts = counts.view(parts, rows, size)
        if depth == 0:  # count the non-finite values, leave them out, rank the finite ones
            low_end, high_start = NONFINITE_TOP_DIGITS
            bad = (counts[0, :, :low_end].sum(dim=1)
                   + counts[0, :, high_start:].sum(dim=1)).cpu().numpy()
            counts[0, :, :low_end] = 0
            counts[0, :, high_start:] = 0
            lo, hi = _finite_ranks(n - bad, level)
            target = torch.from_numpy(np.stack([lo, hi])).to(device)
        if same:
            counts = counts.expand(stats, rows, size)
        cum = below[:, :, None] + counts.cumsum(dim=2)
        chosen = torch.searchsorted(cum, target[:, :, None], right=True)[:, :, 0]
        chosen = chosen.clamp_(max=size - 1)  # only a row without finite values goes past
        below = torch.where(
            chosen > 0, cum.gather(2, (chosen - 1).clamp(min=0)[:, :, None])[:, :, 0], below
        )
        prefix = (prefix << bits) | chosen
    a, b = (key_to_float(prefix[i].cpu().numpy()) for i in range(stats))
    return a, b, bad
