"""Distance concentration of a layer's rows: the relative contrast, :func:`distance_concentration`.

In high dimensions the distances from a point to all others concentrate (Beyer et al. 1999;
Aggarwal et al. 2001): the farthest is barely farther than the nearest, and nearest-neighbour
questions lose meaning. The *relative contrast* of a query row ``q`` is
``(d_max(q) - d_min(q)) / d_min(q)`` over every other row; small values mean concentrated
distances. :func:`distance_concentration` averages it over random query rows (seeded), against
every row of the store, streamed.

Both distances are exact: the nearest by :class:`~dissect.similarity.NeighborSearch`, the
farthest screened with a matrix product and decided by directly computed distances.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .._plumbing.checks import positive_int
from .._plumbing.device import resolve_device
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from ..similarity import NeighborSearch
from ..similarity.features import (
    block_rows,
    check_pool,
    feature_dim,
    iter_features,
    read_rows,
    store_paths,
    warn_incomplete,
)
from ..similarity.neighbors import EPS, check_metric, unit_rows

log = logging.getLogger(__name__)


class _Farthest:
    """The exact largest distance from each query to the streamed rows (its own row excluded)."""

    def __init__(self, queries: torch.Tensor, metric: str, exclude: np.ndarray) -> None:
        self.metric = metric
        self.q = unit_rows(queries) if metric == "cosine" else queries
        self.q_norms = (self.q * self.q).sum(dim=1)
        self.exclude = torch.as_tensor(exclude, device=queries.device)
        self.best = torch.full((len(queries),), -1.0, dtype=torch.float64,
                               device=queries.device)

    def add(self, start: int, x: torch.Tensor) -> None:
        b, dim = x.shape
        if self.metric == "cosine":
            x = unit_rows(x)
            approx = 1.0 - self.q @ x.T
            slack = torch.full_like(self.q_norms, 8 * (dim + 2) * EPS)
        else:
            x_norms = (x * x).sum(dim=1)
            approx = self.q_norms[:, None] + x_norms[None, :] - 2.0 * (self.q @ x.T)
            slack = 8 * (dim + 2) * EPS * (self.q_norms + x_norms.max())
        local = self.exclude - start
        hit = (local >= 0) & (local < b)
        approx[torch.nonzero(hit).flatten(), local[hit]] = -float("inf")
        top = approx.max(dim=1).values
        qi, xi = torch.nonzero(approx >= (top - 2 * slack)[:, None], as_tuple=True)
        if len(qi) == 0:
            return
        a, c = self.q[qi], x[xi]
        if self.metric == "cosine":
            d = (1.0 - (a * c).sum(dim=1)).clamp_(0.0, 2.0)
        else:
            d = ((a - c) ** 2).sum(dim=1)
        best = torch.full_like(self.best, -1.0).scatter_reduce_(0, qi, d, "amax")
        self.best = torch.maximum(self.best, best)

    def result(self) -> np.ndarray:
        d = self.best.sqrt() if self.metric == "euclidean" else self.best
        return d.cpu().numpy()


@store_paths("store")
def distance_concentration(
    store: Any,
    layer: str,
    *,
    queries: int = 100,
    metric: str = "euclidean",
    pool: str | None = "mean",
    seed: int = 0,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """The mean relative contrast ``(d_max - d_min) / d_min`` of random query rows.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`, or the path of one.
    layer
        One of its layers.
    queries
        How many query rows, drawn without replacement (seeded); all rows when the store has
        fewer.
    metric
        ``"euclidean"`` or ``"cosine"`` (``1 - cos``).
    pool
        ``"mean"``, ``"flatten"`` or ``None`` (refuse spatial layers).
    seed
        Seeds the choice of query rows.
    batch_size
        Rows read per block.
    device
        Where to compute (default: CUDA when available, else the CPU).
    progress
        Show a progress bar.

    Returns
    -------
    float
        The mean over the query rows; a query whose nearest other row is at distance 0 (a
        duplicate) has no finite contrast and is left out with a warning.

    Examples
    --------
    >>> distance_concentration(store, "features.18", queries=200)   # doctest: +SKIP
    """
    pool = check_pool(pool)
    metric = check_metric(metric)
    queries = positive_int(queries, "queries")
    batch_size = positive_int(batch_size, "batch_size")
    dev = resolve_device(device)
    feature_dim(store, layer, pool)
    warn_incomplete(store)
    n = len(store)
    if n < 2:
        raise DissectError(f"{store.path} has {n} row(s); distance concentration needs 2")
    rng = np.random.default_rng(int(seed))
    rows = np.sort(rng.choice(n, size=min(queries, n), replace=False)).astype(np.int64)
    q = read_rows(store, layer, rows, pool, batch_size, dev)
    near = NeighborSearch(q, 1, metric, rows)
    far = _Farthest(q, metric, rows)
    step = block_rows(store, [layer], batch_size)
    with progress_bar(-(-n // step), f"contrast {layer}", progress, unit="block") as bar:
        for start, x in iter_features(store, layer, pool, batch_size, dev):
            near.add(start, x)
            far.add(start, x)
            bar.update(1)
    d_min = near.result()[1][:, 0]
    d_max = far.result()
    ok = d_min > 0
    if not ok.any():
        raise DissectError(f"layer {layer!r}: every query row has a duplicate (distance 0); "
                           "the relative contrast is undefined")
    if not ok.all():
        log.warning("layer %s: %d of %d query rows have a duplicate row (distance 0) and are "
                    "left out of the relative contrast", layer, int((~ok).sum()), len(ok))
    return float(np.mean((d_max[ok] - d_min[ok]) / d_min[ok]))
