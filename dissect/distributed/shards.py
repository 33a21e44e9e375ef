"""Shards of a multi-process capture: which rows a rank writes, where, and publishing them.

Rank ``r`` of ``W`` writes an ordinary, resumable store ``<path>.shards/rank{r:05d}-of-{W:05d}.h5``;
rank 0 then publishes ``<path>`` as an HDF5 virtual store over the shards
(:func:`publish_shards`), and :func:`consolidate` copies any store into one standalone file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np

from .._plumbing.deprecation import renamed_kwargs
from .._plumbing.token_grid import TokenGrid
from ..errors import DissectError, StoreError
from ..store import ActivationStore, StoreWriter, create_store

log = logging.getLogger("dissect.distributed")

SHARD_SUFFIX = ".shards"
_SHARD_NAME = re.compile(r"rank(\d{5})-of-(\d{5})\.h5(\.creating)?")
# root attributes a published store takes from the shards unchanged
_PER_SHARD_ATTRS = ("shard",)
_NO_PREFIX = TokenGrid(prefix=0)


def shard_range(n: int, world_size: int, rank: int, align: int = 1) -> range:
    """The contiguous rows ``rank`` handles when ``n`` rows are split over ``world_size`` ranks.

    Rows are grouped into blocks of ``align`` (the batch size) and the blocks are dealt out in
    order, the first ``blocks % world_size`` ranks taking one block more, so the ranges of ranks
    ``0 .. world_size - 1`` concatenate to ``range(n)`` and only the last non-empty one can end
    with a short block. Ranks beyond the number of blocks get an empty range.

    Parameters
    ----------
    n
        Number of rows.
    world_size
        Number of ranks.
    rank
        This rank, ``0 <= rank < world_size``.
    align
        Block size: every range but the last non-empty one is a multiple of it.

    Returns
    -------
    range
        ``range(start, stop)`` with step 1.

    Examples
    --------
    >>> [list(shard_range(10, 3, r)) for r in range(3)]
    [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    >>> [shard_range(10, 3, r, align=4) for r in range(3)]
    [range(0, 4), range(4, 8), range(8, 10)]
    """
    if n < 0 or world_size < 1 or not 0 <= rank < world_size or align < 1:
        raise DissectError(
            f"bad sharding: n={n}, world_size={world_size}, rank={rank}, align={align}"
        )
    blocks = -(-n // align)
    base, extra = divmod(blocks, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return range(min(n, first * align), min(n, last * align))


def shard_dir(path: str | Path) -> Path:
    """The folder holding the shards of the store published at ``path``."""
    path = Path(path)
    return path.with_name(path.name + SHARD_SUFFIX)


def shard_path(path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its shard of the store at ``path``."""
    return shard_dir(path) / f"rank{rank:05d}-of-{world_size:05d}.h5"


def shard_attr(rank: int, world_size: int, rows: range) -> str:
    """The ``shard`` root attribute of a shard file (JSON: rank, world size, dataset rows)."""
    return json.dumps({"rank": rank, "world_size": world_size, "rows": [rows.start, rows.stop]})


def _open_shard(path: Path, expected: str) -> h5py.File:
    if not path.is_file():
        raise StoreError(
            f"shard {path} is missing on rank 0: every rank must write to one filesystem "
            "(a shared NFS/Lustre folder across nodes)"
        )
    f = ActivationStore._open(path)
    if not bool(f.attrs["complete"]) or f.attrs.get("shard") != expected:
        got = f.attrs.get("shard")
        f.close()
        raise StoreError(f"shard {path} is unfinished or of another layout ({got}, not {expected})")
    return f


def publish_shards(path: str | Path, world_size: int, n: int, align: int = 1) -> Path:
    """Publish the shards of ``world_size`` ranks as one virtual store at ``path`` (atomically).

    Every dataset (activations, gradients, maxima, index) of the published file is an HDF5
    virtual dataset whose rows ``shard_range(n, world_size, r, align)`` map shard ``r``'s
    rows, named relative to ``path``'s folder. Root attributes are the shards' (fingerprint,
    model, settings) with ``n_samples = n``, ``complete = True`` and ``shards`` (the JSON list
    of relative shard paths). Shard files of another world size in the shard folder (leftovers
    of an earlier run) are removed.

    Parameters
    ----------
    path
        Where to publish.
    world_size, n, align
        The layout the shards were written with.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    StoreError
        If a shard is missing, unfinished, or disagrees with the others in shape or dtype.
    """
    path = Path(path)
    ranges = [shard_range(n, world_size, r, align) for r in range(world_size)]
    shards = [(shard_path(path, r, world_size), rows) for r, rows in enumerate(ranges) if rows]
    files = []
    try:
        for r, (p, rows) in enumerate(shards):
            files.append(_open_shard(p, shard_attr(r, world_size, rows)))
        first = files[0]
        layers = json.loads(first.attrs["layers"])
        groups = ["activations", "maxima"] + (["gradients"] if "gradients" in first else [])
        names = [f"{g}/{layer}" for g in groups for layer in layers] + ["index"]
        names += [f"prefix/{layer}" for layer in layers if f"prefix/{layer}" in first]
        for (p, _), f in zip(shards, files, strict=True):
            for name in names:
                a, b = first[name], f[name] if name in f else None
                if b is None or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                    got = "missing" if b is None else f"{b.shape[1:]} {b.dtype}"
                    raise StoreError(
                        f"{p}: {name} is {got} but {shards[0][0].name} has "
                        f"{a.shape[1:]} {a.dtype}: inputs must have one size on every rank"
                    )
        rel = [f"{shard_dir(path).name}/{p.name}" for p, _ in shards]
        tmp = path.with_name(path.name + ".creating")
        with h5py.File(tmp, "w") as out:
            attrs = {k: v for k, v in first.attrs.items() if k not in _PER_SHARD_ATTRS}
            out.attrs.update(attrs)
            out.attrs.update({"n_samples": n, "complete": True, "shards": json.dumps(rel)})
            for name in names:
                src = first[name]
                layout = h5py.VirtualLayout(shape=(n, *src.shape[1:]), dtype=src.dtype)
                for (_, rows), relpath in zip(shards, rel, strict=True):
                    shape = (len(rows), *src.shape[1:])
                    layout[rows.start : rows.stop] = h5py.VirtualSource(
                        relpath, name, shape=shape, dtype=src.dtype
                    )
                group, _, leaf = name.rpartition("/")
                parent = out.require_group(group) if group else out
                ds = parent.create_virtual_dataset(leaf, layout)
                ds.attrs.update(dict(src.attrs))
            out.create_dataset("progress", data=np.int64(n))
        os.replace(tmp, path)
    finally:
        for f in files:
            f.close()
    keep = {p.name for p, _ in shards}
    for stale in shard_dir(path).iterdir():
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in keep:
            log.info("removing %s (a shard of an earlier run with another layout)", stale)
            stale.unlink(missing_ok=True)
    log.info("published %s: %d rows from %d shards", path, n, len(shards))
    return path


@renamed_kwargs(dest="path", batch_rows="batch_size")
def consolidate(
    src: str | Path, path: str | Path, *, batch_size: int = 1024, overwrite: bool = False
) -> ActivationStore:
    """Copy a store (for instance a published virtual store) into one standalone HDF5 file.

    Parameters
    ----------
    src
        A complete store.
    path
        The new file (written atomically: under a temporary name until complete).
        (``dest=`` is a deprecated alias, for one release.)
    batch_size
        Rows copied at a time (memory is bounded by them). (``batch_rows=`` is a deprecated
        alias, for one release.)
    overwrite
        Replace an existing ``path``.

    Returns
    -------
    ActivationStore
        The copy, open for reading; it reads exactly like ``src``.
    """
    src, dest = Path(src), Path(path)
    if dest.exists() and not overwrite:
        raise StoreError(f"{dest} exists; pass overwrite=True to replace it")
    if dest.resolve() == src.resolve():
        raise StoreError("consolidate needs a destination other than the source")
    with ActivationStore(src) as store:
        if not store.complete:
            raise StoreError(f"{src} is unfinished: finish the capture before consolidating")
        meta = store.meta
        reserved = {"format", "version", "n_samples", "complete", "layers", "dtype", "pool",
                    "gradients", "shards"}
        grads = bool(meta.get("gradients"))
        n = store.n_samples
        index = store.index
        prefixed = [name for name in store.layers
                    if (store.layout(name) or _NO_PREFIX).prefix]
        tmp = dest.with_name(dest.name + ".copying")
        create_store(
            tmp,
            n=n,
            layers={name: tuple(store[name].shape[1:]) for name in store.layers},
            dtype=meta["dtype"],
            pool=meta["pool"],
            attrs={k: v for k, v in meta.items() if k not in reserved},
            gradients=grads,
            tokens={name: store[name].attrs["tokens"] for name in store.layers
                    if store.layout(name) is not None},
            prefix={name: tuple(store.prefix(name).shape[1:]) for name in prefixed},
        )
        with StoreWriter(tmp) as writer:
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                acts = {name: store[name][start:stop] for name in store.layers}
                maxima = {name: store._layer("maxima", name)[start:stop] for name in store.layers}
                gradients = (
                    {name: store.gradients(name)[start:stop] for name in store.layers}
                    if grads else None
                )
                prefix = {name: store.prefix(name)[start:stop] for name in prefixed}
                writer.write(start, index[start:stop], acts, maxima, gradients, prefix)
            writer.finish()
    os.replace(tmp, dest)
    return ActivationStore(dest)
