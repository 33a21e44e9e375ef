"""Rows of a store layer as feature vectors ``(N, D)``: pooling, block reads and sketches.

Every similarity and geometry measure reads a layer the same way: rows in blocks, each block
turned into float64 feature vectors by ``pool``:

- ``"mean"``: the spatial mean of each channel, ``(N, C, H, W) -> (N, C)``;
- ``"flatten"``: every value, ``(N, C, H, W) -> (N, C*H*W)``;
- ``None``: the stored rows as they are; a layer with spatial axes is refused.

Layers stored pooled, ``(N, C)``, read the same under every ``pool``. Pooling sums in float64
(no float32 rounding of the means). Non-finite values are refused with the layer and rows named:
every measure here would silently turn them into NaN.

:class:`CountSketch` maps wide feature vectors to fewer dimensions (a sparse
Johnson-Lindenstrauss transform, seeded); :func:`dissect.similarity.cka_matrix` uses it for
layers wider than its ``max_dim``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from ..errors import DissectError, StoreError
from ..store import ActivationStore

log = logging.getLogger(__name__)

POOLS = ("mean", "flatten", None)
BLOCK_BYTES = 256 * 2**20  # raw rows read at once, per layer (float32 bytes)


F = TypeVar("F", bound=Callable[..., Any])


def store_paths(*names: str) -> Callable[[F], F]:
    """Let the arguments ``names`` of a function be store paths as well as stores: a path
    is opened as an :class:`~dissect.store.ActivationStore` for the call and closed after."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            opened = []
            try:
                for name in names:
                    value = bound.arguments.get(name)
                    if isinstance(value, (str, os.PathLike)):
                        opened.append(ActivationStore(value))
                        bound.arguments[name] = opened[-1]
                return fn(*bound.args, **bound.kwargs)
            finally:
                for store in opened:
                    store.close()

        return wrapper  # type: ignore[return-value]

    return decorate


def check_pool(pool: Any) -> str | None:
    """``pool`` if it is ``"mean"``, ``"flatten"`` or ``None``, else a :class:`DissectError`."""
    if pool is None or (isinstance(pool, str) and pool in ("mean", "flatten")):
        return pool
    raise DissectError(f"pool must be 'mean', 'flatten' or None, got {pool!r}")


def row_shape(store: Any, layer: str) -> tuple[int, ...]:
    """The stored per-row shape of ``layer`` (``(C,)`` pooled, ``(C, H, W)`` maps)."""
    return tuple(int(s) for s in store[layer].shape[1:])


def feature_dim(store: Any, layer: str, pool: str | None) -> int:
    """How many features a row of ``layer`` has under ``pool``.

    Raises
    ------
    DissectError
        For ``pool=None`` and a layer with spatial axes.
    """
    shape = row_shape(store, layer)
    return dim_of(shape, pool, layer)


def dim_of(shape: Sequence[int], pool: str | None, layer: str) -> int:
    """Features of a row of per-row ``shape`` under ``pool`` (see :func:`feature_dim`)."""
    if len(shape) == 0:
        raise DissectError(f"layer {layer!r} stores one number per row; it needs a channel axis")
    if len(shape) == 1:
        return int(shape[0])
    if pool is None:
        raise DissectError(
            f"layer {layer!r} has rows of shape {tuple(shape)} (spatial axes): pass "
            "pool='mean' (the spatial mean of each channel) or pool='flatten' (every value)")
    if pool == "mean":
        return int(shape[0])
    return int(np.prod(shape, dtype=np.int64))


def pool_rows(block: torch.Tensor, pool: str | None, layer: str) -> torch.Tensor:
    """Rows ``(b, C[, ...])`` of ``layer`` as float64 features ``(b, D)`` under ``pool``."""
    dim_of(tuple(block.shape[1:]), pool, layer)  # the same checks as the dimensions
    if block.ndim == 2:
        return block.to(torch.float64)
    if pool == "mean":
        dims = tuple(range(2, block.ndim))
        count = int(np.prod(block.shape[2:], dtype=np.int64))
        return block.sum(dim=dims, dtype=torch.float64) / count
    return block.reshape(block.shape[0], -1).to(torch.float64)


def check_finite(x: torch.Tensor, layer: str, start: int) -> None:
    """Refuse non-finite features (NaN, inf) of ``layer``, naming the first bad row."""
    ok = torch.isfinite(x).all(dim=1)
    if not bool(ok.all()):
        bad = int(torch.nonzero(~ok)[0, 0]) + start
        raise DissectError(
            f"layer {layer!r} has non-finite activations (NaN or inf), first in row {bad}: "
            "similarity and geometry measures are undefined there; recapture the layer "
            "(e.g. in float32 instead of float16) or analyse other layers")


def warn_incomplete(store: Any) -> None:
    """Log that an unfinished store is read up to its written rows."""
    if not store.complete:
        log.warning("%s is incomplete: using its %d written rows", store.path, len(store))


def read_raw(store: Any, layer: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of ``layer`` as stored (a read failure is a StoreError)."""
    try:
        return np.asarray(store[layer][start:stop])
    except (OSError, RuntimeError) as exc:
        raise StoreError(f"reading rows {start}-{stop} of layer {layer!r} from {store.path} "
                         f"failed ({type(exc).__name__}: {exc}): the file is damaged; "
                         "recapture it") from exc


def read_block(store: Any, layer: str, start: int, stop: int, pool: str | None,
               device: torch.device, *, check: bool = True) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``layer`` as float64 features ``(b, D)`` on ``device``
    (non-finite values refused unless ``check=False``: then the caller checks)."""
    raw = torch.from_numpy(read_raw(store, layer, start, stop)).to(device)
    x = pool_rows(raw, pool, layer)
    if check:
        check_finite(x, layer, start)
    return x


def block_rows(store: Any, layers: Sequence[str], batch_size: int) -> int:
    """Rows per block: ``batch_size``, fewer where one block of a layer's stored rows would
    exceed :data:`BLOCK_BYTES` as float32."""
    rows = batch_size
    for layer in layers:
        row_bytes = 4 * max(1, int(np.prod(row_shape(store, layer), dtype=np.int64)))
        rows = min(rows, max(1, BLOCK_BYTES // row_bytes))
    return rows


def iter_features(store: Any, layer: str, pool: str | None, batch_size: int,
                  device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, features)`` over the written rows of ``layer``, in order.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`.
    layer
        One of its layers.
    pool
        ``"mean"``, ``"flatten"`` or ``None`` (module docstring).
    batch_size
        Rows per block (fewer for wide unpooled maps: :func:`block_rows`).
    device
        Where the features are made.

    Yields
    ------
    (int, torch.Tensor)
        The block's first row and its float64 features ``(b, D)``.
    """
    rows = block_rows(store, [layer], batch_size)
    n = len(store)
    for start in range(0, n, rows):
        yield start, read_block(store, layer, start, min(start + rows, n), pool, device)


def read_rows(store: Any, layer: str, rows: np.ndarray, pool: str | None, batch_size: int,
              device: torch.device) -> torch.Tensor:
    """The features of the given store rows (any order, repeats allowed), ``(len(rows), D)``.

    Only the blocks holding requested rows are read, each once.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n = len(store)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise DissectError(f"row numbers must lie in [0, {n}) for {store.path}; got "
                           f"{int(rows.min())}..{int(rows.max())}")
    dim = feature_dim(store, layer, pool)
    out = torch.empty((len(rows), dim), dtype=torch.float64, device=device)
    if not rows.size:
        return out
    step = block_rows(store, [layer], batch_size)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    blocks = sorted_rows // step
    for b in np.unique(blocks):
        sel = np.nonzero(blocks == b)[0]
        lo, hi = int(sorted_rows[sel[0]]), int(sorted_rows[sel[-1]]) + 1
        feats = read_block(store, layer, lo, hi, pool, device)
        pick = torch.as_tensor(sorted_rows[sel] - lo, device=device)
        out[torch.as_tensor(order[sel], device=device)] = feats[pick]
    return out


class CountSketch:
    """A seeded CountSketch: ``D`` features -> ``k``, each feature added with a random sign
    to one random output coordinate (Charikar et al. 2002; feature hashing).

    It is a sparse Johnson-Lindenstrauss transform: inner products are kept in expectation,
    ``E[<Sx, Sy>] = <x, y>``, with variance ``(|x|^2 |y|^2 + <x, y>^2 - 2 sum_d x_d^2 y_d^2) / k``,
    at most that of a dense Gaussian projection. For the centred Gram matrix ``K`` of ``N`` rows
    the sketched one ``K'`` then has ``E |K' - K|_F^2 <= (tr(K)^2 + |K|_F^2) / k``: a relative
    RMS error of at most ``sqrt((r + 1) / k)``, ``r = tr(K)^2 / |K|_F^2`` the effective rank.
    Memory and time are ``O(D)`` per row (no ``D x k`` matrix).

    Parameters
    ----------
    dim
        Input features ``D``.
    k
        Output features.
    seed
        Seeds the hash and the signs (the same seed gives the same sketch).
    device
        Where the sketch is applied.
    """

    def __init__(self, dim: int, k: int, seed: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(int(seed))
        self.dim, self.k = int(dim), int(k)
        self.bucket = torch.randint(0, self.k, (self.dim,), generator=g).to(device)
        sign = torch.randint(0, 2, (self.dim,), generator=g).to(torch.float64) * 2 - 1
        self.sign = sign.to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sketch rows ``(b, D)`` to ``(b, k)`` (float64)."""
        out = torch.zeros((x.shape[0], self.k), dtype=torch.float64, device=x.device)
        return out.index_add_(1, self.bucket, x * self.sign)
