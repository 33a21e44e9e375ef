"""Exact k nearest stored rows: :func:`nearest` (a store layer) and :class:`NeighborSearch`.

The search streams the data in blocks. For each block a float64 matrix product gives every
query's distances up to a rounding bound; only the rows that can still be among the ``k``
nearest (within that bound of the current ``k``-th) get their distance computed directly
(``sum_d (q_d - x_d)^2``, or ``1 - q^ . x^`` for cosine), and those exact distances decide.
Equal distances are ordered by row number (lower first). Memory: one block of rows and the
``(Q, block)`` distance matrix, whatever the number of rows.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from .._plumbing.checks import positive_int
from .._plumbing.device import resolve_device
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from .features import (
    block_rows,
    check_pool,
    dim_of,
    feature_dim,
    iter_features,
    pool_rows,
    read_rows,
    row_shape,
    store_paths,
    warn_incomplete,
)

METRICS = ("cosine", "euclidean")
EPS = 2.0**-53
PAIR_CHUNK = 1 << 22  # values of (pairs, D) differences computed at once


def check_metric(metric: Any) -> str:
    """``metric`` if it is ``"cosine"`` or ``"euclidean"``, else a :class:`DissectError`."""
    if metric not in METRICS:
        raise DissectError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    return metric


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; zero rows stay zero (cosine distance 1 to everything)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


class NeighborSearch:
    """The exact ``k`` nearest rows of a stream of row blocks, for fixed query vectors.

    Parameters
    ----------
    queries
        float64 ``(Q, D)`` on the device of the blocks.
    k
        Neighbours per query.
    metric
        ``"euclidean"`` (distances ``|q - x|``) or ``"cosine"`` (``1 - cos(q, x)``; a zero
        vector is at distance 1 from everything).
    exclude
        ``(Q,)`` row numbers never returned for each query (its own row), or ``None``; a
        negative entry excludes nothing.

    Examples
    --------
    >>> search = NeighborSearch(q, k=5, metric="euclidean")   # doctest: +SKIP
    >>> for start, block in blocks: search.add(start, block)  # doctest: +SKIP
    >>> indices, distances = search.result()                  # doctest: +SKIP
    """

    def __init__(self, queries: torch.Tensor, k: int, metric: str,
                 exclude: np.ndarray | None = None) -> None:
        self.metric = check_metric(metric)
        self.k = positive_int(k, "k")
        q = queries.to(torch.float64)
        self.device = q.device
        self.dim = q.shape[1]
        self.q = unit_rows(q) if metric == "cosine" else q
        self.q_norms = (self.q * self.q).sum(dim=1)
        n_q = q.shape[0]
        self.exclude = None if exclude is None else torch.as_tensor(
            np.asarray(exclude, dtype=np.int64), device=self.device)
        self.best_d = torch.full((n_q, self.k), float("inf"), dtype=torch.float64,
                                 device=self.device)
        self.best_i = torch.full((n_q, self.k), -1, dtype=torch.int64, device=self.device)

    def _exact(self, qi: torch.Tensor, x: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """Distances (squared for euclidean) of query ``qi[p]`` to block row ``xi[p]``."""
        out = torch.empty(len(qi), dtype=torch.float64, device=self.device)
        step = max(1, PAIR_CHUNK // max(1, self.dim))
        for s in range(0, len(qi), step):
            a, b = self.q[qi[s:s + step]], x[xi[s:s + step]]
            if self.metric == "cosine":
                out[s:s + step] = (1.0 - (a * b).sum(dim=1)).clamp_(0.0, 2.0)
            else:
                diff = a - b
                out[s:s + step] = (diff * diff).sum(dim=1)
        return out

    def add(self, start: int, block: torch.Tensor) -> None:
        """Consider rows ``start .. start + len(block)`` with features ``block`` ``(b, D)``."""
        x = block.to(device=self.device, dtype=torch.float64)
        if x.shape[1] != self.dim:
            raise DissectError(f"rows have {x.shape[1]} features, the queries {self.dim}")
        b = x.shape[0]
        if b == 0:
            return
        if self.metric == "cosine":
            x = unit_rows(x)
            approx = torch.addmm(torch.ones((), dtype=x.dtype, device=x.device), self.q, x.T,
                                 alpha=-1.0)
            slack = torch.full_like(self.q_norms, 8 * (self.dim + 2) * EPS + 1e-300)
        else:
            x_norms = (x * x).sum(dim=1)
            approx = torch.addmm(x_norms[None, :], self.q, x.T, alpha=-2.0)
            approx.add_(self.q_norms[:, None])
            slack = 8 * (self.dim + 2) * EPS * (self.q_norms + x_norms.max()) + 1e-300
        if self.exclude is not None:
            local = self.exclude - start
            hit = (local >= 0) & (local < b)
            rows = torch.nonzero(hit).flatten()
            approx[rows, local[hit]] = float("inf")
        # the k-th distance to beat: the current k-th, or this block's k-th (its approximation
        # plus the rounding bound), whichever is smaller; rows within the bound of it are
        # candidates, decided by their exact distances
        kth = self.best_d[:, -1]
        if b >= self.k:
            block_kth = torch.topk(approx, self.k, dim=1, largest=False).values[:, -1]
            kth = torch.minimum(kth, block_kth + slack)
        # a finite bound, so that excluded rows (inf) never pass
        limit = (kth + slack).clamp_(max=torch.finfo(torch.float64).max)
        keep = approx <= limit[:, None]
        qi, xi = torch.nonzero(keep, as_tuple=True)
        if len(qi) == 0:
            return
        d = self._exact(qi, x, xi)
        self._merge(qi, xi + start, d)

    def _merge(self, qi: torch.Tensor, rows: torch.Tensor, d: torch.Tensor) -> None:
        n_q, k = self.best_d.shape
        all_q = torch.cat([torch.arange(n_q, device=self.device).repeat_interleave(k), qi])
        all_i = torch.cat([self.best_i.flatten(), rows])
        all_d = torch.cat([self.best_d.flatten(), d])
        # lexicographic (query, distance, row): stable sorts from the last key to the first;
        # unfilled slots (row -1, distance inf) sort after every real row
        order = torch.argsort(torch.where(all_i < 0, torch.iinfo(torch.int64).max, all_i),
                              stable=True)
        order = order[torch.argsort(all_d[order], stable=True)]
        order = order[torch.argsort(all_q[order], stable=True)]
        q_sorted = all_q[order]
        counts = torch.bincount(q_sorted, minlength=n_q)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order), device=self.device) - first[q_sorted]
        top = rank < k
        sel = order[top]
        self.best_d[q_sorted[top], rank[top]] = all_d[sel]
        self.best_i[q_sorted[top], rank[top]] = all_i[sel]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, distances)``: int64 and float64 numpy arrays ``(Q, k)``, nearest first."""
        d = self.best_d.sqrt() if self.metric == "euclidean" else self.best_d
        return self.best_i.cpu().numpy(), d.cpu().numpy()


def _queries(store: Any, layer: str, queries: Any, pool: str | None, batch_size: int,
             device: torch.device) -> tuple[torch.Tensor, np.ndarray | None]:
    """Query features and, for row-number queries, the rows to exclude."""
    n = len(store)
    if isinstance(queries, numbers.Integral) and not isinstance(queries, bool):
        queries = [int(queries)]
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().cpu().numpy()
    arr = np.asarray(queries)
    if arr.dtype == bool or arr.dtype == object or arr.size == 0:
        raise DissectError("queries must be store row numbers (ints) or feature vectors "
                           f"(floats), and not empty; got {arr.dtype} of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.ndim != 1:
            raise DissectError(f"row-number queries must be 1-D, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= n:
            raise DissectError(f"query rows must lie in [0, {n}) ({store.path} has {n} rows); "
                               f"got {int(arr.min())}..{int(arr.max())}")
        rows = arr.astype(np.int64)
        return read_rows(store, layer, rows, pool, batch_size, device), rows
    if not np.issubdtype(arr.dtype, np.floating):
        raise DissectError(f"queries must be ints (rows) or floats (vectors), got {arr.dtype}")
    dim = feature_dim(store, layer, pool)
    stored = row_shape(store, layer)
    if arr.ndim == 1:
        arr = arr[None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    if tuple(t.shape[1:]) == stored and len(stored) > 1:
        t = pool_rows(t, pool, layer)
    elif t.ndim != 2 or t.shape[1] != dim:
        raise DissectError(
            f"query vectors must have shape (Q, {dim}) (layer {layer!r} under pool={pool!r})"
            + (f" or (Q, {', '.join(map(str, stored))}) like its stored rows"
               if len(stored) > 1 else "") + f"; got {tuple(arr.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise DissectError("query vectors hold NaN or infinite values")
    return t, None


@store_paths("store")
def nearest(
    store: Any,
    layer: str,
    queries: Any,
    *,
    k: int = 5,
    metric: str = "cosine",
    pool: str | None = "mean",
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest stored rows of ``layer`` for each query.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`, or the path of one.
    layer
        One of its layers.
    queries
        Row numbers of the store (ints; each query's own row is never returned), or feature
        vectors (floats): ``(Q, D)`` in the pooled feature space, ``(Q, C, H, W)`` like the
        stored rows (pooled the same way), or one vector ``(D,)``.
    k
        Neighbours per query (at most the rows available).
    metric
        ``"cosine"`` (distance ``1 - cos``; zero vectors are at distance 1 from everything) or
        ``"euclidean"``.
    pool
        ``"mean"``, ``"flatten"`` or ``None`` (see :func:`~dissect.similarity.cka_matrix`).
    batch_size
        Stored rows per block.
    device
        Where to compute (default: CUDA when available, else the CPU).
    progress
        Show a progress bar.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``indices`` int64 ``(Q, k)`` (store rows, nearest first; equal distances by lower row)
        and ``distances`` float64 ``(Q, k)``.

    Notes
    -----
    Exact: float64 throughout, candidates screened with a rounding bound and decided by
    directly computed distances (see the module docstring).

    Examples
    --------
    >>> idx, dist = nearest(store, "layer4", [0, 17], k=5)   # doctest: +SKIP
    """
    pool = check_pool(pool)
    metric = check_metric(metric)
    k = positive_int(k, "k")
    batch_size = positive_int(batch_size, "batch_size")
    dev = resolve_device(device)
    dim_of(row_shape(store, layer), pool, layer)
    warn_incomplete(store)
    q, exclude = _queries(store, layer, queries, pool, batch_size, dev)
    n = len(store)
    available = n - (1 if exclude is not None else 0)
    if k > available:
        raise DissectError(f"k={k} neighbours asked for, but only {available} rows are "
                           f"available ({n} rows in {store.path}"
                           + (", minus the query's own)" if exclude is not None else ")"))
    search = NeighborSearch(q, k, metric, exclude)
    step = block_rows(store, [layer], batch_size)
    with progress_bar(-(-n // step), f"nearest {layer}", progress, unit="block") as bar:
        for start, block in iter_features(store, layer, pool, batch_size, dev):
            search.add(start, block)
            bar.update(1)
    return search.result()
