"""CKA between every pair of layers, streamed from activation stores: :func:`cka_matrix`.

One pass over the rows accumulates, in float64, every sum that linear CKA needs (see
:mod:`.linear_cka`): the cross-products ``X_u^T X_v`` of all layer pairs at once (the
concatenated features of a row block times themselves: one matrix product per block, only its
upper triangle when a store is compared with itself), column sums, and for the debiased form the
row-norm sums. Memory is independent of the number of rows:
``(sum D)^2`` floats for the products, never an ``N x N`` Gram matrix.

Layers wider than ``max_dim`` (flattened maps) are sketched first (:class:`.CountSketch`, a
seeded sparse Johnson-Lindenstrauss transform), and the result states an error bound for every
pair that involves one. When the products of all pairs would exceed ``max_bytes``, the layers
are split into groups and the pairs of groups spread over several passes over the store.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._plumbing.checks import optional_positive_int, positive_int
from .._plumbing.device import resolve_device
from .._plumbing.progress import progress_bar
from .._plumbing.store_layers import StoreLayers, store_layers
from ..errors import DissectError
from .features import (
    CountSketch,
    block_rows,
    check_finite,
    check_pool,
    feature_dim,
    read_block,
    store_paths,
    warn_incomplete,
)
from .linear_cka import PairMoments, cka_from_hsic, hsic
from .result import SimilarityResult

log = logging.getLogger(__name__)

MAX_DIM = 8192
MAX_BYTES = 2 * 2**30
TILE_MIN = 256


@dataclass
class _Unit:
    """One layer of one store, as the features CKA reads."""

    side: int  # 0: ``store``, 1: ``other``
    layer: str
    features: int  # D under ``pool``
    dim: int  # D after the sketch
    sketch: CountSketch | None
    # per-unit sums (float64, on the device), filled by the first pass reading the unit
    total: torch.Tensor | None = None
    norms: float = 0.0
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    done: bool = False


@dataclass
class _Block:
    """The products of one pair of unit groups: ``Z_left^T Z_right`` ("full"), or only each
    unit's own ``X_u^T X_u`` ("diag": a group paired with itself where no other pair is
    needed)."""

    left: list[int]
    right: list[int]
    mode: str
    cross: Any = None  # full: tensor; diag: {unit: tensor}
    rr: Any = None  # full: (|L|, |R|) sums of a_u a_v; diag: {unit: float}
    left_norms_by_right: Any = None  # full: (|L|, sum D_R): sum_i a_u,i z_R,i; diag: {u: vec}
    right_norms_by_left: Any = None  # full: (|R|, sum D_L)
    left_at: dict[int, tuple[int, int]] = field(default_factory=dict)  # full: column ranges
    right_at: dict[int, tuple[int, int]] = field(default_factory=dict)
    tiles: list[tuple[int, int]] = field(default_factory=list)  # a group with itself: only the
    # tiles on and above the diagonal are computed (every pair u <= v lies there)

    def nbytes(self, units: list[_Unit]) -> int:
        if self.mode == "diag":
            return 8 * sum(units[u].dim ** 2 for u in self.left)
        return 8 * sum(units[u].dim for u in self.left) * sum(units[u].dim for u in self.right)


def _open_units(stores: list[Any], row_layers: list[str], col_layers: list[str], col_side: int,
                pool: str | None, max_dim: int | None, seed: int,
                device: torch.device) -> tuple[list[_Unit], list[int], list[int], int]:
    """Units (rows' first, then the columns' new ones), the unit of each row and column, and
    how many units the rows use."""
    units: list[_Unit] = []
    key: dict[tuple[int, str], int] = {}

    def unit(side: int, layer: str) -> int:
        if (side, layer) not in key:
            d = feature_dim(stores[side], layer, pool)
            sketch = None
            dim = d
            if max_dim is not None and d > max_dim:
                # seeded by the layer's name: the same layer gets the same sketch in every call
                # (and in both stores, so that a layer compared with itself stays at 1)
                sketch = CountSketch(d, max_dim, seed * 1_000_003 + zlib.crc32(layer.encode()),
                                     device)
                dim = max_dim
            key[(side, layer)] = len(units)
            units.append(_Unit(side, layer, d, dim, sketch))
        return key[(side, layer)]

    rows = [unit(0, name) for name in row_layers]
    n_row_units = len(units)
    cols = [unit(col_side, name) for name in col_layers]
    return units, rows, cols, n_row_units


def _plan(units: list[_Unit], rows: list[int], cols: list[int], n_row_units: int,
          max_bytes: int) -> list[list[_Block]]:
    """Group the units and spread the products of the needed group pairs over passes."""
    group_dims = max(1, math.isqrt(max_bytes // 8))
    too_wide = [u for u in units if u.dim > group_dims]
    if too_wide:
        u = too_wide[0]
        raise DissectError(
            f"layer {u.layer!r} has {u.dim} features: its {u.dim} x {u.dim} float64 product "
            f"needs {8 * u.dim ** 2 / 2**30:.2f} GiB, over max_bytes={max_bytes}; lower max_dim "
            "(wider layers are then sketched) or raise max_bytes")
    group_of: dict[int, int] = {}
    groups: list[list[int]] = []
    for segment in (range(n_row_units), range(n_row_units, len(units))):
        width = group_dims + 1
        for u in segment:
            if width + units[u].dim > group_dims:
                groups.append([])
                width = 0
            groups[-1].append(u)
            group_of[u] = len(groups) - 1
            width += units[u].dim
    pairs = {(min(r, c), max(r, c)) for r in rows for c in cols}
    pairs |= {(u, u) for u in set(rows) | set(cols)}
    needed: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for u, v in pairs:
        needed.setdefault((group_of[u], group_of[v]), set()).add((u, v))
    blocks = []
    for (g, h), unit_pairs in sorted(needed.items()):
        if g == h and all(u == v for u, v in unit_pairs):
            blocks.append(_Block(sorted(u for u, _ in unit_pairs), [], "diag"))
        else:
            blocks.append(_Block(groups[g], groups[h], "full"))
    passes: list[list[_Block]] = []
    used = max_bytes + 1
    for block in blocks:
        size = block.nbytes(units)
        if used + size > max_bytes:
            passes.append([])
            used = 0
        passes[-1].append(block)
        used += size
    return passes


def _offsets(units: list[_Unit], members: list[int]) -> dict[int, tuple[int, int]]:
    out, at = {}, 0
    for u in members:
        out[u] = (at, at + units[u].dim)
        at += units[u].dim
    return out


def _tiles(units: list[_Unit], members: list[int]) -> list[tuple[int, int]]:
    """Column ranges of about a sixth of the width each (at least 256), at unit boundaries."""
    width = sum(units[u].dim for u in members)
    target = max(TILE_MIN, width // 6)
    tiles, start, at = [], 0, 0
    for u in members:
        at += units[u].dim
        if at - start >= target:
            tiles.append((start, at))
            start = at
    if at > start:
        tiles.append((start, at))
    return tiles


def _span(at: dict[int, tuple[int, int]], members: list[int]) -> tuple[int, int]:
    """The columns of consecutive ``members`` (a group) in the concatenated features."""
    return at[members[0]][0], at[members[-1]][1]


def _accumulate_pass(blocks: list[_Block], units: list[_Unit], stores: list[Any], pool: str | None,
                     debiased: bool, n: int, step: int, device: torch.device, bar: Any) -> None:
    """Read every row block once and add its products to the blocks' sums.

    The features of all units of the pass are concatenated per row block (``z``, groups are
    consecutive columns), so each step is a few large operations whatever the number of
    layers."""
    members = sorted({u for b in blocks for u in b.left + b.right})
    at = _offsets(units, members)
    slot = {u: i for i, u in enumerate(members)}
    width = sum(units[u].dim for u in members)
    f64 = torch.float64
    indicator = torch.zeros((width, len(members)), dtype=f64, device=device)
    for u in members:
        indicator[at[u][0]:at[u][1], slot[u]] = 1.0
    for b in blocks:
        if b.mode == "diag":
            b.cross = {u: torch.zeros((units[u].dim,) * 2, dtype=f64, device=device)
                       for u in b.left}
            b.rr = dict.fromkeys(b.left, 0.0)
            b.left_norms_by_right = {u: torch.zeros(units[u].dim, dtype=f64, device=device)
                                     for u in b.left}
        else:
            b.left_at, b.right_at = _offsets(units, b.left), _offsets(units, b.right)
            dl, dr = sum(units[u].dim for u in b.left), sum(units[u].dim for u in b.right)
            b.cross = torch.zeros((dl, dr), dtype=f64, device=device)
            b.tiles = _tiles(units, b.left) if b.left == b.right else []
            if debiased:
                b.rr = torch.zeros((len(b.left), len(b.right)), dtype=f64, device=device)
                b.left_norms_by_right = torch.zeros((len(b.left), dr), dtype=f64, device=device)
                b.right_norms_by_left = torch.zeros((len(b.right), dl), dtype=f64, device=device)
    shift = total = low = high = None
    norms = torch.zeros(len(members), dtype=f64, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        parts = []
        for u in members:
            unit = units[u]
            x = read_block(stores[unit.side], unit.layer, start, stop, pool, device, check=False)
            parts.append(x if unit.sketch is None else unit.sketch(x))
        z = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        del parts
        if not bool(torch.isfinite(z).all()):
            for u in members:  # name the layer and the row
                check_finite(z[:, at[u][0]:at[u][1]], units[u].layer, start)
        if shift is None:  # a fixed shift (the first block's mean) keeps the sums small
            shift = z.mean(dim=0)
            total = torch.zeros(width, dtype=f64, device=device)
            low, high = z.amin(dim=0) - shift, z.amax(dim=0) - shift
        z -= shift
        total += z.sum(dim=0)
        torch.minimum(low, z.amin(dim=0), out=low)
        torch.maximum(high, z.amax(dim=0), out=high)
        rows_norms = (z * z) @ indicator if debiased else None  # (b, members): |x_i|^2
        if rows_norms is not None:
            norms += rows_norms.sum(dim=0)
        for b in blocks:
            if b.mode == "diag":
                for u in b.left:
                    x = z[:, at[u][0]:at[u][1]]
                    b.cross[u].addmm_(x.T, x)
                    if debiased:
                        a = rows_norms[:, slot[u]]
                        b.rr[u] += float(a @ a)
                        b.left_norms_by_right[u] += a @ x
                continue
            l0, l1 = _span(at, b.left)
            r0, r1 = _span(at, b.right)
            zl, zr = z[:, l0:l1], z[:, r0:r1]
            if b.tiles:  # symmetric: each strip of rows from its diagonal on
                for a0, a1 in b.tiles:
                    b.cross[a0:a1, a0:].addmm_(zl[:, a0:a1].T, zl[:, a0:])
            else:
                b.cross.addmm_(zl.T, zr)
            if debiased:
                rl = rows_norms[:, slot[b.left[0]]:slot[b.left[-1]] + 1]
                rr = rows_norms[:, slot[b.right[0]]:slot[b.right[-1]] + 1]
                b.rr += rl.T @ rr
                b.left_norms_by_right += rl.T @ zr
                b.right_norms_by_left += rr.T @ zl
        bar.update(1)
    for u in members:
        unit = units[u]
        if not unit.done:
            c0, c1 = at[u]
            unit.total, unit.low, unit.high = total[c0:c1], low[c0:c1], high[c0:c1]
            unit.norms = float(norms[slot[u]])
            unit.done = True


def _moments(blocks: list[_Block], units: list[_Unit], u: int, v: int, n: int,
             debiased: bool) -> PairMoments:
    """The :class:`PairMoments` of units ``u <= v`` from the block that holds them."""
    for b in blocks:
        if b.mode == "diag" and u == v and u in b.cross:
            m = PairMoments(n, b.cross[u], units[u].total, units[u].total, units[u].norms,
                            units[u].norms)
            if debiased:
                m.norms_xy = b.rr[u]
                m.x_by_norms_y = m.y_by_norms_x = b.left_norms_by_right[u]
            return m
        if b.mode == "full" and u in b.left and v in b.right:
            (l0, l1), (r0, r1) = b.left_at[u], b.right_at[v]
            m = PairMoments(n, b.cross[l0:l1, r0:r1], units[u].total, units[v].total,
                            units[u].norms, units[v].norms)
            if debiased:
                iu, iv = b.left.index(u), b.right.index(v)
                m.norms_xy = float(b.rr[iu, iv])
                m.y_by_norms_x = b.left_norms_by_right[iu, r0:r1]
                m.x_by_norms_y = b.right_norms_by_left[iv, l0:l1]
            return m
    raise AssertionError(f"no block holds the pair {u}, {v}")  # pragma: no cover - planner bug


def _block_hsic(b: _Block, units: list[_Unit], n: int, debiased: bool,
                needed: set[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """HSIC of every needed pair of a block, all pairs at once (the formulas of
    :mod:`.linear_cka`, with sums over each pair's sub-block taken by indicator products)."""
    if b.mode == "diag":
        return {(u, u): hsic(_moments([b], units, u, u, n, debiased), debiased)
                for u in b.left if (u, u) in needed}
    f64, dev = torch.float64, b.cross.device

    def side(members: list[int], at: dict[int, tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        width = at[members[-1]][1]
        ind = torch.zeros((width, len(members)), dtype=f64, device=dev)
        for j, u in enumerate(members):
            ind[at[u][0]:at[u][1], j] = 1.0
        total = torch.cat([units[u].total for u in members])
        norms = torch.tensor([units[u].norms for u in members], dtype=f64, device=dev)
        return ind, total, norms

    il, sl, nl = side(b.left, b.left_at)
    ir, sr, nr = side(b.right, b.right_at)
    if not debiased:
        squares = (b.cross - torch.outer(sl, sr) / n).square_()
        out = il.T @ squares @ ir
    else:
        # per pair (u, v): |C|^2, s_u' C s_v, (X_u' b_v) . s_u, (Y_v' a_u) . s_v
        frob = il.T @ (b.cross * b.cross) @ ir
        weighted_l, weighted_r = il * sl[:, None], ir * sr[:, None]
        s_c_s = weighted_l.T @ b.cross @ weighted_r
        x_by_b = (b.right_norms_by_left @ weighted_l).T
        y_by_a = b.left_norms_by_right @ weighted_r
        sum_k = (sl * sl) @ il - nl
        sum_l = (sr * sr) @ ir - nr
        trace = frob - b.rr
        middle = s_c_s - x_by_b - y_by_a + b.rr
        out = (trace + torch.outer(sum_k, sum_l) / ((n - 1) * (n - 2))
               - 2.0 * middle / (n - 2)) / (n * (n - 3))
    values = out.cpu().numpy()
    return {(u, v): float(values[i, j]) for i, u in enumerate(b.left)
            for j, v in enumerate(b.right) if (u, v) in needed}


def _check_rows(store: Any, other: Any) -> int:
    n = len(store)
    if other is None:
        return n
    if len(other) != n:
        raise DissectError(
            f"{store.path} has {n} rows but {other.path} has {len(other)}: CKA compares two "
            "representations of the same inputs; capture both models on the same data")
    if not np.array_equal(store.index, other.index):
        bad = int(np.nonzero(store.index != other.index)[0][0])
        raise DissectError(
            f"{store.path} and {other.path} do not index the same inputs (row {bad} is dataset "
            f"item {int(store.index[bad])} in one and {int(other.index[bad])} in the other): "
            "capture both models on the same data, in the same order")
    a, b = store.meta.get("data_source"), other.meta.get("data_source")
    if a and b and a != b:
        log.warning("%s and %s record different data sources (%r, %r); their rows index the "
                    "same items, so they are compared", store.path, other.path, a, b)
    return n


@store_paths("store", "other")
def cka_matrix(
    store: Any,
    layers: StoreLayers = None,
    other: Any = None,
    other_layers: StoreLayers = None,
    *,
    pool: str | None = "mean",
    debiased: bool = False,
    batch_size: int = 1024,
    max_dim: int | None = MAX_DIM,
    max_bytes: int = MAX_BYTES,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SimilarityResult:
    """Linear CKA between every pair of layers of one store, or of two stores.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore` (or its path); its layers are the rows.
    layers
        Its layers to compare (``None``: all, in capture order; a name, a list or a predicate).
    other
        A second store (or path) captured on the same inputs (another model): its layers are the
        columns. ``None``: the columns are layers of ``store``. Both must index the same
        dataset items in the same order (else a :class:`DissectError`).
    other_layers
        The columns' layers (``None``: every layer of ``other``, or the same as ``layers``).
    pool
        How a ``(N, C, H, W)`` layer becomes ``(N, D)``: ``"mean"`` (spatial mean, ``D = C``),
        ``"flatten"`` (``D = C*H*W``) or ``None`` (such layers are refused). Pooled stores
        ``(N, C)`` read the same under every choice.
    debiased
        The debiased CKA (unbiased HSIC, Nguyen et al. 2021) instead of the biased one.
    batch_size
        Rows read per block (fewer for wide unpooled maps, so that one block of one layer
        stays under 256 MiB).
    max_dim
        Layers with more features are sketched to ``max_dim`` features by a seeded
        CountSketch (approximate; see Notes). ``None``: never (every pair exact).
    max_bytes
        Memory for the float64 products; when all pairs need more, the layers are grouped and
        the store is read once per batch of group pairs.
    seed
        Seeds the sketches (together with each layer's name, so a layer is sketched the same
        way in every call).
    device
        Where to compute (default: CUDA when available, else the CPU).
    progress
        Show a progress bar.

    Returns
    -------
    SimilarityResult
        ``.matrix`` ``(len(layers), len(other_layers))``, ``.rows``, ``.cols``, ``.error``.

    Raises
    ------
    DissectError
        For unknown layers, stores of different rows, a layer with spatial axes and
        ``pool=None``, a layer with zero variance or non-finite values, too few rows (2; 4 when
        debiased).

    Notes
    -----
    **Exact** (up to float64 accumulation) for layers of at most ``max_dim`` features:
    ``X^T Y``, ``X^T X``, ``Y^T Y``, column sums (and for the debiased form ``sum |x_i|^2
    |y_i|^2``, ``X^T |y|^2``, ``Y^T |x|^2``) are accumulated over row blocks after subtracting
    each layer's first-block mean (CKA is shift invariant). Memory: ``8 (sum D)^2`` bytes for the
    products plus one block of rows, whatever the number of rows.

    **Sketched layers** (more than ``max_dim`` features): ``x -> S x`` with a CountSketch of
    ``k = max_dim`` rows. The sketched centred Gram matrix ``K'`` of a layer has a relative RMS
    error ``eps = sqrt(E|K' - K|_F^2) / |K|_F <= sqrt((r + 1) / k)``, where ``r = tr(K)^2 /
    |K|_F^2`` is the layer's effective rank (estimated from the sketch). CKA is the cosine of
    the two centred Gram matrices, and moving each by a relative ``eps`` moves the cosine by at
    most ``2 (eps_x + eps_y)``: that bound is ``result.error[i, j]`` (0 for exact pairs), at one
    RMS of the Gram errors (by Chebyshev, ``t`` times it holds with probability at least
    ``1 - 2 / t^2``). For the debiased form the same number is reported as an estimate.

    Examples
    --------
    >>> result = cka_matrix(store)                          # doctest: +SKIP
    >>> result.matrix.shape, result.rows[:2]                # doctest: +SKIP
    >>> result.plot("cka.png"); print(result.summary())     # doctest: +SKIP
    >>> cka_matrix(store_a, other=store_b, debiased=True)   # doctest: +SKIP
    """
    pool = check_pool(pool)
    batch_size = positive_int(batch_size, "batch_size")
    max_dim = optional_positive_int(max_dim, "max_dim")
    max_bytes = positive_int(max_bytes, "max_bytes")
    if not isinstance(debiased, bool):
        raise DissectError(f"debiased must be True or False, got {debiased!r}")
    dev = resolve_device(device)
    row_layers = store_layers(store, layers, what="compare")
    if other is None:
        col_layers = row_layers if other_layers is None else store_layers(
            store, other_layers, what="compare")
        stores, col_side = [store], 0
    else:
        col_layers = store_layers(other, other_layers, what="compare")
        stores, col_side = [store, other], 1
    n = _check_rows(store, other)
    need = 4 if debiased else 2
    if n < need:
        raise DissectError(f"CKA needs at least {need} rows{' (debiased)' if debiased else ''}; "
                           f"{store.path} has {n}")
    for s in stores:
        warn_incomplete(s)
    units, rows, cols, n_row_units = _open_units(stores, row_layers, col_layers, col_side, pool,
                                                 max_dim, int(seed), dev)
    passes = _plan(units, rows, cols, n_row_units, max_bytes)
    step = min(block_rows(stores[u.side], [u.layer], batch_size) for u in units)
    sketched = [u for u in units if u.sketch is not None]
    if sketched:
        log.warning("CKA sketches %d layer(s) wider than max_dim=%d to %d features (approximate;"
                    " error bounds in result.error): %s", len(sketched), max_dim, max_dim,
                    ", ".join(f"{u.layer} ({u.features})" for u in sketched))
    if len(passes) > 1:
        log.info("the products of all layer pairs exceed max_bytes=%d: %d passes over the rows",
                 max_bytes, len(passes))
    n_blocks = -(-n // step)
    with progress_bar(len(passes) * n_blocks, "CKA", progress, unit="block", outer=True) as bar:
        for blocks in passes:
            _accumulate_pass(blocks, units, stores, pool, debiased, n, step, dev, bar)
    blocks = [b for p in passes for b in p]
    for u in units:
        if bool((u.low == u.high).all()):
            raise DissectError(
                f"layer {u.layer!r} of {stores[u.side].path} has zero variance (every feature "
                f"is constant over the {n} rows): CKA with it is undefined; leave it out")
    needed = {(min(u, v), max(u, v)) for u in rows for v in cols}
    needed |= {(u, u) for u in set(rows) | set(cols)}
    values: dict[tuple[int, int], float] = {}
    for b in blocks:
        values.update(_block_hsic(b, units, n, debiased, needed))
    gram_error = {}
    for i in sorted(set(rows) | set(cols)):
        if units[i].sketch is not None:
            m = _moments(blocks, units, i, i, n, debiased)
            centred = m.cross - torch.outer(m.sum_x, m.sum_y) / n
            rank = float(torch.trace(centred)) ** 2 / float((centred * centred).sum())
            gram_error[i] = math.sqrt((rank + 1) / units[i].dim)
    matrix = np.zeros((len(rows), len(cols)))
    error = np.zeros_like(matrix)
    for a, u in enumerate(rows):
        for b, v in enumerate(cols):
            matrix[a, b] = cka_from_hsic(
                values[(min(u, v), max(u, v))], values[(u, u)], values[(v, v)], debiased,
                (f"layer {units[u].layer!r}", f"layer {units[v].layer!r}"))
            error[a, b] = 2 * (gram_error.get(u, 0.0) + gram_error.get(v, 0.0))
    settings = {
        "pool": pool, "debiased": debiased, "rows_compared": n, "store": str(store.path),
        "other": None if other is None else str(other.path), "max_dim": max_dim,
        "max_bytes": max_bytes, "seed": int(seed), "passes": len(passes),
        "sketched": [{"store": str(stores[u.side].path), "layer": u.layer,
                      "features": u.features, "sketch_dims": u.dim,
                      "gram_error": gram_error.get(i)}
                     for i, u in enumerate(units) if u.sketch is not None],
    }
    return SimilarityResult(matrix, row_layers, col_layers,
                            error=error if sketched else None, settings=settings)
