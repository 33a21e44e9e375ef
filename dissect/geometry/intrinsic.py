"""Intrinsic dimension of a layer's rows: TwoNN (Facco et al. 2017), :func:`intrinsic_dimension`.

For each point, ``mu = r2 / r1``, the ratio of the distances to its second and first nearest
neighbours, follows a Pareto law ``F(mu) = 1 - mu^(-d)`` on a ``d``-dimensional manifold of
locally uniform density. TwoNN sorts the ratios, discards the largest ``discard_fraction``
(10%, as in the paper), and fits ``-log(1 - F_emp(mu_(i))) = d log(mu_(i))`` through the origin
by least squares, with ``F_emp(mu_(i)) = i / N`` over all ``N`` ratios. This is exactly the
variant of scikit-dimension's ``skdim.id.TwoNN()`` (``method='linear'``, ``discard_fraction=0.1``),
including dropping points with a duplicate (``r1 = 0``) with a warning.

Neighbour distances are exact (:class:`~dissect.similarity.NeighborSearch`, float64) over at
most ``max_rows`` rows drawn at random (seeded) when the store has more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._plumbing.checks import optional_positive_int, positive_int
from .._plumbing.device import resolve_device
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from ..similarity import NeighborSearch
from ..similarity.features import (
    check_pool,
    feature_dim,
    read_rows,
    store_paths,
    warn_incomplete,
)

log = logging.getLogger(__name__)

MAX_ROWS = 10_000
QUERY_ROWS = 1024
DATA_ROWS = 4096
IN_MEMORY_BYTES = 8 * 2**30


def sample_rows(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """All ``n`` rows, or ``max_rows`` of them drawn without replacement (seeded), sorted."""
    if max_rows is None or n <= max_rows:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_rows, replace=False)).astype(np.int64)


def sample_features(store: Any, layer: str, pool: str | None, max_rows: int | None, seed: int,
                    batch_size: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The features of the sampled rows in memory, and their row numbers."""
    rows = sample_rows(len(store), max_rows, seed)
    need = 8 * len(rows) * feature_dim(store, layer, pool)
    if need > IN_MEMORY_BYTES:
        raise DissectError(
            f"layer {layer!r}: {len(rows)} rows of {feature_dim(store, layer, pool)} features "
            f"need {need / 2**30:.1f} GiB in memory; lower max_rows or use pool='mean'")
    return read_rows(store, layer, rows, pool, batch_size, device), rows


def two_nearest(x: torch.Tensor, progress: bool = False, desc: str = "TwoNN") -> np.ndarray:
    """Each row's exact distances to its nearest and second nearest other rows, ``(M, 2)``."""
    m = x.shape[0]
    out = np.empty((m, 2))
    chunks = range(0, m, QUERY_ROWS)
    with progress_bar(len(chunks), desc, progress, unit="chunk") as bar:
        for q0 in chunks:
            q1 = min(q0 + QUERY_ROWS, m)
            search = NeighborSearch(x[q0:q1], 2, "euclidean", np.arange(q0, q1))
            for s in range(0, m, DATA_ROWS):
                search.add(s, x[s:s + DATA_ROWS])
            out[q0:q1] = search.result()[1]
            bar.update(1)
    return out


def twonn_fit(r1: Any, r2: Any, discard_fraction: float = 0.1) -> float:
    """The TwoNN dimension from nearest and second-nearest distances (module docstring).

    Parameters
    ----------
    r1, r2
        ``(N,)`` distances of each point to its first and second nearest neighbour.
    discard_fraction
        Share of the largest ratios left out of the fit, in ``(0, 1)`` (the largest ratio has
        ``F_emp = 1``, where the fitted ``-log(1 - F)`` is infinite).

    Returns
    -------
    float
    """
    if not 0 < discard_fraction < 1:
        raise DissectError(f"discard_fraction must be in (0, 1), got {discard_fraction!r} "
                           "(the paper discards 0.1)")
    r1 = np.asarray(r1, dtype=np.float64)
    r2 = np.asarray(r2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = r2 / r1
    finite = np.isfinite(mu)
    if not finite.all():
        log.warning("TwoNN: dropping %d point(s) at distance 0 from their nearest neighbour "
                    "(duplicate rows)", int((~finite).sum()))
        mu = mu[finite]
    n = len(mu)
    keep = min(int(n * (1 - discard_fraction)), n - 1)
    if keep < 2:
        raise DissectError(f"TwoNN needs at least 2 ratios after discarding; {n} distinct "
                           "points leave fewer: use more rows")
    mu = np.sort(mu)[:keep]
    x = np.log(mu)
    y = -np.log(1 - np.arange(1, keep + 1) / n)
    denom = float(x @ x)
    if denom == 0:
        raise DissectError("TwoNN: every neighbour-distance ratio is 1 (a regular grid of "
                           "points?); the dimension is undefined")
    return float(x @ y) / denom


ESTIMATORS: dict[str, Callable[[np.ndarray, float], float]] = {
    "twonn": lambda d, f: twonn_fit(d[:, 0], d[:, 1], f),
}


@store_paths("store")
def intrinsic_dimension(
    store: Any,
    layer: str,
    *,
    method: str = "twonn",
    pool: str | None = "mean",
    max_rows: int | None = MAX_ROWS,
    discard_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """The intrinsic dimension of one layer's rows.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`, or the path of one.
    layer
        One of its layers.
    method
        ``"twonn"`` (Facco et al. 2017; the module docstring gives the exact variant, that of
        scikit-dimension).
    pool
        ``"mean"``, ``"flatten"`` or ``None`` (refuse spatial layers).
    max_rows
        Use at most this many rows, drawn at random (seeded); ``None``: all. The cost is
        ``max_rows^2 * D``.
    discard_fraction
        Share of the largest distance ratios left out of the fit (0.1 in the paper).
    seed
        Seeds the choice of rows.
    batch_size
        Rows read per block.
    device
        Where the distances are computed (default: CUDA when available, else the CPU).
    progress
        Show a progress bar.

    Returns
    -------
    float

    Examples
    --------
    >>> intrinsic_dimension(store, "features.18")   # doctest: +SKIP
    """
    if method not in ESTIMATORS:
        raise DissectError(f"method must be one of {', '.join(map(repr, ESTIMATORS))}; got "
                           f"{method!r}")
    pool = check_pool(pool)
    max_rows = optional_positive_int(max_rows, "max_rows")
    batch_size = positive_int(batch_size, "batch_size")
    dev = resolve_device(device)
    feature_dim(store, layer, pool)
    warn_incomplete(store)
    if len(store) < 3:
        raise DissectError(f"{store.path} has {len(store)} rows; TwoNN needs at least 3")
    x, _ = sample_features(store, layer, pool, max_rows, int(seed), batch_size, dev)
    distances = two_nearest(x, progress, f"TwoNN {layer}")
    return ESTIMATORS[method](distances, float(discard_fraction))
