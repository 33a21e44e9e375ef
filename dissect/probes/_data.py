"""Labels, the stratified split, and per-layer probe features read from an activation store.

Features of one layer go through: pooling (per row chunk, as read from HDF5; or a transformer
layer's class token, read from the prefix tokens the store keeps), standardization
with the training rows' mean and standard deviation, an optional reduction to ``max_features``
columns (PCA on the standardized training rows, or a Gaussian random projection), and a leading
column of ones (the bias). Rows are stored in *split order* (fit rows, validation rows, test rows)
so that every subset the fit needs is a leading or trailing range of rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._plumbing.progress import progress_bar
from ..errors import DataError, DissectError
from ..store import ActivationStore
from ._fit import Block

log = logging.getLogger(__name__)

POOLS = ("mean", "max", "cls", None)


# --------------------------------------------------------------------------- labels


def dataset_targets(store: ActivationStore, dataset: Any = None) -> np.ndarray:
    """The per-row class labels of the dataset a store was captured from.

    Parameters
    ----------
    store
        The activation store; its ``/index`` maps each row to a dataset item.
    dataset
        A dataset with a ``targets`` attribute (e.g. :class:`~dissect.datasets.SyntheticConcepts`)
        or a data-source spec for :func:`~dissect.datasets.open_dataset`. ``None`` uses the spec
        the store records under the root attribute ``dataset`` (``capture(..., dataset=SPEC)``
        and every ``dissect`` command that captures record it).

    Returns
    -------
    numpy.ndarray
        int64 ``(rows,)``: ``targets[store.index]``.
    """
    from ..datasets import open_dataset

    index = store.index
    if dataset is None:
        spec = store.meta.get("dataset")
        if isinstance(spec, str) and spec:
            dataset = open_dataset(spec)
        else:
            raise DataError(
                f"{store.path} does not record the dataset it was captured from: pass the "
                "dataset (or --dataset SPEC), or the labels as an array / .npy file")
    elif isinstance(dataset, (str, Path)):
        dataset = open_dataset(str(dataset))
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(f"{type(dataset).__name__} has no `targets`: pass the labels as an "
                        "array (or a .npy file) aligned with the store's rows")
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    if len(index) and (index.min() < 0 or index.max() >= len(targets)):
        raise DataError(f"the store's rows index dataset items up to {index.max()}, but the "
                        f"dataset has {len(targets)} targets: is it the dataset captured?")
    return targets[index]


def resolve_labels(store: ActivationStore, labels: Any) -> np.ndarray:
    """Labels as an int64 array with one entry per written row of ``store``."""
    n = len(store)
    if isinstance(labels, str):
        if labels != "targets":
            raise DataError(f"labels must be an array, a dataset or 'targets', not {labels!r}")
        labels = dataset_targets(store)
    elif hasattr(labels, "targets") and not isinstance(labels, (np.ndarray, torch.Tensor)):
        labels = dataset_targets(store, labels)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"labels must be 1-D (one class per row), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError("labels must be integer class indices; got non-integer floats")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise DataError(f"labels must be integers, got dtype {arr.dtype}")
    if len(arr) != n:
        if len(arr) == store.n_samples and n < store.n_samples:
            log.warning("%s is incomplete: probing its first %d rows", store.path, n)
            arr = arr[:n]
        else:
            raise DataError(f"{len(arr)} labels for {n} store rows: labels must be aligned "
                            "with the store's rows (one per row, in row order)")
    arr = arr.astype(np.int64)
    if len(np.unique(arr)) < 2:
        raise DataError(f"the labels hold a single class ({arr[0] if len(arr) else 'none'}): "
                        "a probe needs at least two")
    return arr


# --------------------------------------------------------------------------- splits


def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` over classes proportionally to ``counts`` (largest remainders)."""
    exact = counts * total / counts.sum()
    take = np.floor(exact).astype(np.int64)
    rest = total - take.sum()
    if rest > 0:
        frac = exact - take + rng.random(len(counts)) * 1e-9  # random tie-break
        take[np.argsort(-frac, kind="stable")[:rest]] += 1
    return np.minimum(take, np.maximum(counts - 1, 0))  # every class keeps a row on the left


def stratified_split(
    labels: np.ndarray, test_size: float | int, seed: int | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into ``(train, test)``, keeping class proportions.

    Deterministic from ``seed``. The test share is ``ceil(test_size * N)`` rows (or
    ``test_size`` rows when it is an int), allocated to classes in proportion to their size
    (largest remainders); every class keeps at least one training row.

    Parameters
    ----------
    labels
        ``(N,)`` class labels.
    test_size
        A fraction in (0, 1) or a number of rows.
    seed
        Seed (or seed sequence) of the ``numpy`` generator.

    Returns
    -------
    train, test : numpy.ndarray
        Sorted int64 row indices.
    """
    n = len(labels)
    if isinstance(test_size, (int, np.integer)) and not isinstance(test_size, bool):
        n_test = int(test_size)
    elif isinstance(test_size, float) and 0.0 < test_size < 1.0:
        n_test = math.ceil(test_size * n)
    else:
        raise DissectError(f"test_size must be a fraction in (0, 1) or a row count, "
                           f"got {test_size!r}")
    if not 0 < n_test < n:
        raise DissectError(f"test_size={test_size!r} leaves {n_test} of {n} rows for testing")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    take = _allocate(counts, n_test, rng)
    test = []
    for c in range(len(classes)):
        rows = np.flatnonzero(inverse == c)
        test.append(rng.permutation(rows)[: take[c]])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(n), test_idx).astype(np.int64)
    return train_idx, test_idx


# --------------------------------------------------------------------------- features


@dataclass
class LayerPlan:
    """How one layer's features are produced and where they live."""

    name: str
    position: int
    input_features: int
    n_features: int
    reduction: str | None
    source: str  # "activations", "maxima" or "prefix" (the class token)
    rotate: bool = False  # express the features in their principal axes (no loss)
    in_memory: bool = True
    explained_variance: float | None = None
    variances: np.ndarray | None = None  # training variance of each final feature


def plan_layer(
    store: ActivationStore, name: str, position: int, pool: str | None,
    max_features: int | None, reduction: str, pca_max_dim: int, rotate_max_dim: int = 0,
    stored_pool: Any = None,
) -> LayerPlan:
    """Decide the feature count, source dataset, reduction and rotation of one layer.

    ``stored_pool`` is the pooling the store was captured with (its ``pool`` attribute).
    """
    ds = store[name]
    if pool == "cls":
        source, d_in = "prefix", class_token_width(store, name)
    elif pool == "max" and (ds.ndim > 2 or stored_pool not in (None, "max")):
        source, d_in = "maxima", int(ds.shape[1])  # per-sample spatial maxima, stored exactly
    elif ds.ndim <= 2 or pool is not None:
        source, d_in = "activations", int(ds.shape[1]) if ds.ndim > 1 else 1
        if ds.ndim == 2 and pool is not None and stored_pool not in (None, pool):
            log.warning("layer %s was stored %s-pooled at capture; probing it as stored, not "
                        "with pool=%r", name, stored_pool, pool)
    else:
        source, d_in = "activations", int(np.prod(ds.shape[1:]))
    k, how = d_in, None
    if max_features is not None and d_in > max_features:
        k = int(max_features)
        how = reduction if reduction != "auto" else ("pca" if d_in <= pca_max_dim else "random")
    rotate = how == "pca" or (how is None and 1 < d_in <= rotate_max_dim)
    return LayerPlan(name, position, d_in, k, how, source, rotate=rotate)


def class_token_width(store: ActivationStore, name: str) -> int:
    """The width ``C`` of ``name``'s class token, or an error saying why it has none.

    ``pool="cls"`` reads the first prefix token (the class token) a store keeps for a layer
    captured from token outputs (:meth:`ActivationStore.prefix`, ``(N, P, C)``).
    """
    layout = store.layout(name)
    if layout is None or not layout.prefix or not layout.class_token:
        read = "was not read from token outputs" if layout is None else \
            f"was read from token outputs without prefix tokens ({layout})" \
            if not layout.prefix else f"has prefix tokens but no class token ({layout})"
        raise DissectError(
            f"pool='cls' reads the class token, but layer {name!r} of {store.path} has none: "
            f"it {read}. Probe it with pool='mean' (the mean over its patch tokens or its "
            "map), or choose the transformer layers that have a class token with layers=")
    return int(store.prefix(name).shape[2])


def _pooled_chunks(
    store: ActivationStore, plan: LayerPlan, pool: str | None, n: int, read_bytes: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first row, (b, D_in) float32 features)`` in store row order."""
    if plan.source == "maxima":
        data = store.maxima(plan.name)[:n]
        step = max(1, read_bytes // max(1, data.shape[1] * 4))
        for s in range(0, n, step):
            yield s, np.ascontiguousarray(data[s : s + step], dtype=np.float32)
        return
    if plan.source == "prefix":  # the class token: the first prefix token of each row
        tokens = store.prefix(plan.name)
        step = max(1, read_bytes // max(1, plan.input_features * 4))
        for s in range(0, n, step):
            yield s, np.asarray(tokens[s : min(n, s + step), 0], dtype=np.float32)
        return
    ds = store[plan.name]
    row_elems = int(np.prod(ds.shape[1:], dtype=np.int64)) if ds.ndim > 1 else 1
    step = max(1, read_bytes // max(1, row_elems * 4))
    for s in range(0, n, step):
        block = torch.from_numpy(ds[s : min(n, s + step)]).float()
        if block.ndim == 1:
            block = block[:, None]
        elif block.ndim > 2:
            dims = tuple(range(2, block.ndim))
            if pool == "mean":
                block = block.mean(dim=dims)
            elif pool == "max":
                block = block.amax(dim=dims)
            else:
                block = block.reshape(len(block), -1)
        yield s, block.numpy()


@dataclass
class _Writer:
    """Where the final features of one layer go: a device block slot or an array on disk."""

    x: torch.Tensor | None = None  # (G, N, width) block tensor
    slot: int = 0
    array: np.ndarray | None = None  # (N, width) memmap

    def write(self, positions: np.ndarray | slice, values: torch.Tensor) -> None:
        if self.x is not None:
            if isinstance(positions, slice):
                self.x[self.slot, positions, 1 : 1 + values.shape[1]] = values.to(self.x)
            else:
                pos = torch.as_tensor(positions, device=self.x.device)
                self.x[self.slot, pos, 1 : 1 + values.shape[1]] = values.to(self.x)
        else:
            assert self.array is not None
            self.array[positions, 1 : 1 + values.shape[1]] = values.cpu().numpy()


def build_layer(
    store: ActivationStore,
    plan: LayerPlan,
    pool: str | None,
    *,
    n: int,
    position: np.ndarray,
    n_train: int,
    writer: _Writer,
    budget: int,
    read_bytes: int,
    seed: int,
    device: torch.device,
    progress: bool,
) -> None:
    """Pool, standardize (training statistics) and reduce one layer into ``writer``.

    ``position[row]`` is the split-order position of store row ``row``; the training rows are
    positions ``0:n_train``. With enough ``budget`` the pooled rows are held in memory once;
    otherwise every pass re-reads the store in row chunks.
    """
    d_in = plan.input_features
    step = max(1, read_bytes // max(1, d_in * 4))  # rows per chunk of the in-memory copy
    raw: np.ndarray | None = None
    if n * d_in * 4 <= budget:
        raw = np.empty((n, d_in), dtype=np.float32)
    bar = progress_bar(n, f"read {plan.name}", progress, unit="row")

    def passes(first: bool) -> Iterator[tuple[np.ndarray | slice, np.ndarray]]:
        if raw is not None and not first:
            for s in range(0, n, step):
                yield slice(s, min(n, s + step)), raw[s : s + step]
            return
        for s, chunk in _pooled_chunks(store, plan, pool, n, read_bytes):
            if first:
                bad = ~np.isfinite(chunk)
                if bad.any():
                    row = s + int(np.argwhere(bad)[0][0])
                    raise DataError(f"layer {plan.name!r} has NaN or infinite activations "
                                    f"(row {row} first): recapture with dtype='float32', or "
                                    "check the model")
                bar.update(len(chunk))
            pos = position[s : s + len(chunk)]
            if raw is not None:
                raw[pos] = chunk
            yield pos, chunk

    # pass 1: training mean and variance (float64)
    total = np.zeros(d_in)
    total_sq = np.zeros(d_in)
    try:
        if raw is not None:
            for _ in passes(True):
                pass
            for s in range(0, n_train, step):
                part = raw[s : min(n_train, s + step)]
                total += part.sum(0, dtype=np.float64)
                total_sq += np.square(part, dtype=np.float64).sum(0)
        else:
            for pos, chunk in passes(True):
                part = chunk[pos < n_train]
                total += part.sum(0, dtype=np.float64)
                total_sq += np.square(part, dtype=np.float64).sum(0)
    finally:
        bar.close()
    mean = total / n_train
    var = np.maximum(total_sq / n_train - mean**2, 0.0)
    std = np.sqrt(var)
    std[std <= 1e-7 * (1.0 + np.abs(mean))] = 1.0  # constant features: centred, not scaled
    mean_t = torch.from_numpy(mean).float()
    std_t = torch.from_numpy(std).float()

    def standardized(chunk: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(chunk) - mean_t) / std_t

    # pass 2 (rotation / reduction): principal axes of the standardized training rows, or a
    # random projection. A rotation changes neither the probe's predictions nor its L2 penalty;
    # it diagonalizes the features' covariance so that L-BFGS can be preconditioned exactly.
    proj: torch.Tensor | None = None
    if plan.rotate:
        cov = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        for pos, chunk in passes(False):
            if isinstance(pos, slice):
                z = standardized(chunk[: max(0, min(pos.stop, n_train) - pos.start)])
            else:
                z = standardized(chunk[pos < n_train])
            z = z.to(device=device, dtype=torch.float32)
            cov.addmm_(z.T, z)
        evals, evecs = torch.linalg.eigh(cov)  # float32: orthogonal to ~1e-6, 2-3x faster
        evals = evals.double()
        evals = evals.flip(0).clamp(min=0)
        proj = evecs.flip(1)[:, : plan.n_features].float()
        if plan.reduction == "pca":
            total_var = float(evals.sum())
            plan.explained_variance = (
                float(evals[: plan.n_features].sum()) / total_var if total_var > 0 else 1.0)
        del cov, evecs
    elif plan.reduction == "random":
        gen = torch.Generator().manual_seed(int(seed))
        proj = torch.randn(d_in, plan.n_features, generator=gen) / math.sqrt(plan.n_features)
        proj = proj.to(device)
    elif plan.reduction is not None:
        raise DissectError(f"unknown reduction {plan.reduction!r}: use 'pca' or 'random'")

    # pass 3: final features into their place (and their training variances)
    sq = torch.zeros(plan.n_features, dtype=torch.float64, device=device)
    for pos, chunk in passes(False):
        z = standardized(chunk).to(device)
        if proj is not None:
            z = z @ proj
        if isinstance(pos, slice):
            train_part = z[: max(0, min(pos.stop, n_train) - pos.start)]
        else:
            train_part = z[torch.as_tensor(pos < n_train, device=device)]
        sq += (train_part.double() ** 2).sum(0)
        writer.write(pos, z)
    plan.variances = (sq / n_train).cpu().numpy()


def group_widths(widths: dict[int, int], ratio: float = 1.25) -> list[list[int]]:
    """Group layers (position -> width) so that widths within a group differ by <= ``ratio``."""
    groups: list[list[int]] = []
    for pos in sorted(widths, key=lambda p: (widths[p], p)):
        if groups and widths[pos] <= ratio * widths[groups[-1][0]]:
            groups[-1].append(pos)
        else:
            groups.append([pos])
    return groups


def make_blocks(
    plans: list[LayerPlan],
    n: int,
    *,
    budget: int,
    itemsize: int,
    read_bytes: int,
    device: torch.device,
    dtype: torch.dtype,
    tmpdir: Path,
) -> tuple[list[Block], dict[int, _Writer], int]:
    """Allocate feature storage: device blocks while they fit ``budget``, memmaps otherwise.

    Returns the blocks, a writer per layer position, and the bytes held in memory.
    """
    widths = {p.position: p.n_features + 1 for p in plans}
    blocks: list[Block] = []
    writers: dict[int, _Writer] = {}
    used = 0
    for group in group_widths(widths):
        width = max(widths[p] for p in group)
        size = len(group) * n * width * itemsize
        if used + size <= budget:
            x = torch.zeros(len(group), n, width, dtype=dtype, device=device)
            x[:, :, 0] = 1.0
            blocks.append(Block(group, width, x=x))
            for slot, p in enumerate(group):
                writers[p] = _Writer(x=x, slot=slot)
            used += size
            continue
        for p in group:  # out of core: one block per layer, rows streamed from disk
            plan = plans[p]
            plan.in_memory = False
            path = tmpdir / f"layer{p}.npy"
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(str(dtype)[6:]),
                                            shape=(n, widths[p]))
            arr[:, 0] = 1.0
            rows = max(1, read_bytes // (widths[p] * itemsize))
            blocks.append(Block([p], widths[p], arrays=[arr], chunk_rows=rows))
            writers[p] = _Writer(array=arr)
            log.info("layer %s: %d x %d features exceed the memory budget; streaming them from "
                     "%s at every step", plan.name, n, widths[p] - 1, path)
    return blocks, writers, used
