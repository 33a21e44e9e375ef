"""Network Dissection's run: :func:`dissect` scores every unit of chosen layers against every
concept of a concept dataset.

Thresholds first (one exact-quantile pass per layer over the store), then one pass over the
annotations in which each batch's label planes are read once and every layer's
:class:`~dissect.netdissect.tally.IoUTally` counts against them. The semantics are in the
package documentation (:mod:`dissect.netdissect`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._plumbing.checks import one_of, positive_int
from .._plumbing.deprecation import renamed_kwargs
from .._plumbing.device import PreparedModel, prepare_model, resolve_device
from .._plumbing.finite import NonFiniteTally, merged_tallies
from .._plumbing.progress import progress_bar
from .._plumbing.store_layers import store_layers
from .._plumbing.token_grid import stored_layouts
from ..datasets.annotation_cache import annotation_batches
from ..distributed import DistContext
from ..distributed import resolve as resolve_distributed
from ..errors import DissectError
from ..hooks.capture import capture
from ..hooks.layers import LayerSelector
from ..hooks.select import Selector
from ..hooks.tokens import TokensSpec
from ..stats import exact_quantiles, top_rows
from ..store import ActivationStore
from .checkpoint import load_checkpoint, run_identity, save_checkpoint
from .result import DissectionResult
from .tally import AREAS, ENGINES, IoUTally

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Options:
    """:func:`dissect`'s counting options, passed on to :func:`_dissect_store`."""

    engine: str = "auto"
    area: str = "annotated"
    checkpoint: Path | None = None
    checkpoint_every: int = 50
    overwrite: bool = False
    annotation_cache: bool | str | Path | None = True


def _check_dataset(dataset: Any) -> None:
    for attr in ("concepts", "categories"):
        if not hasattr(dataset, attr):
            raise DissectError(
                f"dataset has no .{attr}: dissection needs a ConceptDataset "
                "(Broden, SyntheticConcepts, or one with the same contract)"
            )


@renamed_kwargs(top_k="k")
def dissect(
    source: ActivationStore | nn.Module | PreparedModel,
    dataset: Any,
    layers: LayerSelector | None = None,
    *,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    categories: list[str] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int = 0,
    store_path: str | Path | None = None,
    k: int = 16,
    distributed: DistContext | bool | None = None,
    engine: str = "auto",
    area: str = "annotated",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    overwrite: bool = False,
    annotation_cache: bool | str | Path | None = True,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> DissectionResult:
    """Score every unit of the chosen layers against every concept of a concept dataset.

    Parameters
    ----------
    source
        An :class:`~dissect.ActivationStore` captured over ``dataset`` with ``pool=None``
        (rows aligned by its ``/index``), or a model (or :class:`~dissect.PreparedModel`):
        then its activations are captured first into ``store_path`` with the dataset's
        transform. Without ``store_path`` that store is temporary: made in the folder
        ``TMPDIR`` names when the call starts (else the system's), and removed when the call
        returns or fails.
    dataset
        A concept dataset (``concepts``, ``categories``, items with label planes), or a
        data-source spec naming one, as the CLI's ``--data`` (``"synthetic:N"``,
        ``"broden:PATH"``, a Broden folder; :func:`dissect.datasets.resolve_data`), opened
        without a transform: pass a dataset built with the model's preprocessing when a model
        is captured here and needs one.
    layers
        Layers to dissect (default: every layer of the store). Required for a model.
    quantile
        Top fraction of activations that counts as active (NetDissect: 0.005).
    iou_threshold
        A unit is a detector when its best IoU exceeds this (NetDissect: 0.04).
    categories
        Score only concepts of these categories (default: all).
    batch_size
        Images per counting step.
    device
        Where counting runs, with :class:`IoUTally`'s default engine (numba's compiled kernel
        on the CPU, vectorized torch ops elsewhere: the same counts). ``None``: where the
        model is, when ``source`` is a model (:func:`dissect.prepare_model`); else CUDA when
        available, else the CPU.
    progress
        Show progress bars.
    num_workers
        DataLoader workers reading the annotations.
    store_path
        Where to capture when ``source`` is a model. That store is kept (a rerun resumes or
        reuses it), also when the call fails.
    k
        How many top images per unit to keep (from the store's maxima; an image whose maximum
        is NaN or infinite ranks last). (``top_k=`` is a deprecated alias, for one release.)
    distributed
        Multi-process runs (:mod:`dissect.distributed`): ``None`` detects an initialized
        process group or ``torchrun``'s variables, ``False`` forces one process, or pass a
        :class:`~dissect.distributed.DistContext`. Each rank scores a contiguous shard of the
        rows; thresholds and counts are merged exactly and every rank returns the same result,
        identical to a single process's. A model is captured across the ranks first
        (``store_path`` must then be on a filesystem every rank sees; the default temporary
        folder is rank 0's, which only works on one machine). Only rank 0 shows progress bars.
    engine
        How the counting runs (:class:`IoUTally`): ``"auto"`` (numba's compiled kernel on the
        CPU when numba imports, vectorized torch ops elsewhere), ``"numba"`` or ``"torch"``.
        Every engine gives the same counts.
    area
        Which images a unit's active area counts on for a category (the ``A`` of
        ``IoU = I / (A + L - I)``): ``"annotated"`` (default): every image on which the
        category is annotated; ``"lite"``: NetDissect-Lite's rule, only the images where one
        of the unit's active pixels carries a label of that category (or the image has an
        image-level label of it). ``"lite"`` reproduces published NetDissect-Lite numbers; it
        shrinks the union, so object and part concepts score higher (most for small, rare
        concepts).
    checkpoint
        A file to make the counting resumable: the thresholds, and every
        ``checkpoint_every`` batches the tallies and the position, are written to it
        atomically. If it exists and belongs to this run (the same store content, dataset,
        layers, quantile, concepts and ``area``: :func:`.checkpoint.run_identity`), counting
        resumes from it, with the same result as an uninterrupted run; if it belongs to
        another run, a :class:`DissectError` lists the differences. It is removed when the
        call returns a result. Single-process runs only.
    checkpoint_every
        Batches between checkpoints.
    overwrite
        Start over even when ``checkpoint`` exists (it is replaced).
    annotation_cache
        Where decoded label planes are cached for every later dissection of the same dataset
        (:mod:`dissect.datasets.annotation_cache`): ``True`` (default): the folder
        ``$DISSECT_CACHE_DIR``, else ``~/.cache/torch-dissect``; a folder; ``False``: decode
        the dataset's annotations every time. Only datasets with a ``cache_identity()``
        (Broden, SyntheticConcepts) are cached.
    tokens, select
        When ``source`` is a model: how token outputs become maps and which tensor of a
        module's output is its output, as for :func:`dissect.capture` (``"auto"`` reads the
        layers of torchvision's and timm's ViTs and Swin as ``(C, h, w)`` maps). A store
        records its layers' layouts, so a store needs neither.

    Returns
    -------
    DissectionResult
        Its ``meta["nonfinite"]`` maps every layer to its number of non-finite activation
        values (NaN, ``+inf``, ``-inf``; 0 when all are finite).

    Notes
    -----
    Non-finite activations never wipe a layer out: each threshold is the quantile of the unit's
    finite values (``numpy.nanquantile``), a pixel is active only when its upsampled value is
    finite and above it, and a unit without any finite value gets the threshold ``+inf``
    (never active, never a detector). Each layer holding a non-finite value gets one warning
    on the ``"dissect"`` logger naming the layer, the count (NaN, +inf, -inf), the first
    affected store rows and the units without a finite value
    (:class:`dissect._plumbing.finite.NonFiniteTally`); only rank 0 logs it.
    """
    from ..datasets.sources import resolve_data

    dataset, spec = resolve_data(dataset)
    _check_dataset(dataset)
    if not 0 < quantile < 1:
        raise DissectError(f"quantile must be in (0, 1), got {quantile}")
    positive_int(batch_size, "batch_size")
    positive_int(k, "k")
    positive_int(checkpoint_every, "checkpoint_every")
    one_of(engine, "engine", ENGINES)  # before a capture, not after it
    one_of(area, "area", AREAS)
    ctx = resolve_distributed(distributed, device)
    if checkpoint is not None and ctx is not None:
        raise DissectError("checkpoint= resumes single-process runs; under torchrun, leave it "
                           "out (each rank's share is short) or run one process")
    opts = _Options(engine, area, None if checkpoint is None else Path(checkpoint),
                    checkpoint_every, overwrite, annotation_cache)
    if not isinstance(source, (nn.Module, PreparedModel)):
        if not isinstance(source, ActivationStore):
            raise DissectError("source must be an ActivationStore or a torch.nn.Module")
        dev = ctx.device(device) if ctx is not None else resolve_device(device)
        return _dissect_store(source, dataset, layers, quantile, iou_threshold, categories,
                              batch_size, dev, progress, num_workers, k, ctx, opts)
    if layers is None:
        raise DissectError("give layers=... when dissecting a model")
    run = prepare_model(source, ctx.device(device) if ctx is not None else device)
    with _store_for(store_path, ctx) as (path, finished):
        store = capture(run, dataset, layers, path, batch_size=batch_size, dataset=spec,
                        device=run.device, progress=progress, num_workers=num_workers,
                        distributed=ctx if ctx is not None else False, tokens=tokens,
                        select=select)
        with store:
            result = _dissect_store(store, dataset, layers, quantile, iou_threshold,
                                    categories, batch_size, run.device, progress, num_workers,
                                    k, ctx, opts)
        finished.append(True)
    return result


@contextmanager
def _store_for(store_path: str | Path | None, ctx: DistContext | None
               ) -> Iterator[tuple[Path, list[bool]]]:
    """The path to capture a model into: ``store_path`` (kept), or a temporary folder in
    ``TMPDIR`` removed on exit, also on errors. Append to the yielded list once the store was
    read to the end (with several ranks, rank 0 then waits for the others before removing)."""
    finished: list[bool] = []
    if store_path is not None:
        yield Path(store_path), finished
        return
    where = os.environ.get("TMPDIR") or None  # read now, not when tempfile first ran
    if ctx is None:
        folder = tempfile.mkdtemp(prefix="dissect-", dir=where)
    else:
        folder = ctx.on_main("make a temporary folder",
                             lambda: tempfile.mkdtemp(prefix="dissect-", dir=where))
    try:
        yield Path(folder) / "activations.h5", finished
    finally:
        if ctx is not None and finished:  # every rank is done reading before rank 0 removes
            ctx.barrier("remove the temporary store")
        if ctx is None or ctx.is_main:
            shutil.rmtree(folder, ignore_errors=True)


def _threshold_batches(ds: Any, rows: range, read: int) -> Callable[[], Iterator[torch.Tensor]]:
    """:func:`~dissect.stats.exact_quantiles`' ``batches`` for one layer: its ``rows`` read
    ``read`` at a time as ``(units, values)`` float32 blocks, through two buffers reused from
    batch to batch (each block is valid until the next is read; ``exact_quantiles`` holds no
    batch beyond its step). Allocating each block anew (numpy's reads and torch's aligned
    copies interleaved) fragments glibc's heap, by up to ~300 MB that RSS keeps."""
    units, hw = ds.shape[1], int(np.prod(ds.shape[2:]))
    held = np.empty(read * units * hw, dtype=ds.dtype)
    flat = np.empty(read * units * hw, dtype=np.float32)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(rows.start, rows.stop, read):
            m = min(read, rows.stop - start)
            block = held[: m * units * hw].reshape(m, units, *ds.shape[2:])
            ds.read_direct(block, np.s_[start : start + m])
            out = flat[: m * units * hw].reshape(units, m, hw)
            np.copyto(out, block.reshape(m, units, hw).transpose(1, 0, 2))
            yield torch.from_numpy(out.reshape(units, m * hw))

    return batches


def _note_rows(tally: NonFiniteTally, rows: range, read: int, shape: tuple[int, ...]
               ) -> Callable[[int, torch.Tensor], None]:
    """:func:`~dissect.stats.exact_quantiles`' ``on_nonfinite`` for the batches of
    :func:`_threshold_batches`: adds batch ``i`` (store rows from ``rows.start + i * read``)
    to ``tally``, as ``(rows, units, h, w)``. exact_quantiles calls it only for the batches
    holding a non-finite value: on finite data, counting costs nothing more than its own
    check."""
    units, h, w = shape

    def note(i: int, batch: torch.Tensor) -> None:
        tally.add(batch.reshape(units, -1, h, w).transpose(0, 1), rows.start + i * read)

    return note


def _dissect_store(
    store: ActivationStore,
    dataset: Any,
    layers: LayerSelector | None,
    quantile: float,
    iou_threshold: float,
    categories: list[str] | None,
    batch_size: int,
    dev: torch.device,
    progress: bool,
    num_workers: int,
    k: int,
    ctx: DistContext | None = None,
    opts: _Options = _Options(),
) -> DissectionResult:
    if not store.complete:
        raise DissectError(f"{store.path} is an unfinished capture: rerun capture to finish it")
    names = store_layers(store, layers, what="dissect")
    for name in names:
        if store[name].ndim != 4:
            raise DissectError(
                f"layer {name!r} is stored as {store[name].shape}: dissection needs spatial maps "
                "(N, C, H, W); capture with pool=None"
            )
    all_cats = list(dataset.categories)
    if categories is not None:
        unknown = sorted(set(categories) - set(all_cats))
        if unknown:
            raise DissectError(f"unknown categories {unknown}; the dataset has {all_cats}")
    keep = set(categories or all_cats)
    concepts = [c for c in dataset.concepts if c.category in keep and c.number != 0]
    cats = [c for c in all_cats if c in keep]
    index = store.index
    if len(index) and (index.min() < 0 or index.max() >= len(dataset)):
        raise DissectError(f"{store.path} rows index items beyond the dataset's {len(dataset)}")
    stored_dtype = np.dtype(store[names[0]].dtype)
    # this rank's rows (all of them in one process); results are merged exactly below
    rows = ctx.shard(len(store), batch_size) if ctx is not None else range(len(store))
    progress = progress and (ctx is None or ctx.is_main)
    identity = (run_identity(store, dataset, names, quantile, concepts, cats, opts.area)
                if opts.checkpoint is not None else {})
    saved = (load_checkpoint(opts.checkpoint, identity, opts.overwrite)
             if opts.checkpoint is not None else None)
    tallies = {name: IoUTally(store[name].shape[1], concepts, all_cats, device=dev,
                              engine=opts.engine, area=opts.area) for name in names}
    if saved is not None:  # resume: the thresholds and counts so far come from the checkpoint
        thresholds = saved["thresholds"]
        found = {name: merged_tallies([saved["nonfinite"][name]]) for name in names}
        for name in names:
            tallies[name].load_state_dict(saved["tallies"][name])
        start = int(saved["position"])
        log.info("resuming Network Dissection from %s: %d of %d rows counted",
                 opts.checkpoint, start, len(rows))
    else:
        thresholds, found = _thresholds(store, names, rows, quantile, dev, ctx)
        start = 0
    if ctx is None or ctx.is_main:
        for name in names:  # one warning per layer holding a NaN or an infinity
            found[name].warn()

    def save(position: int) -> None:
        if opts.checkpoint is not None:
            save_checkpoint(opts.checkpoint, identity, position, thresholds,
                            {name: found[name].state_dict() for name in names},
                            {name: tallies[name].state_dict() for name in names})

    if saved is None:
        save(0)  # the threshold pass is never repeated
    # ... then one pass over the annotations for all layers: each batch's label planes are
    # read once, and every layer's tally counts against them
    thr_t = {name: torch.from_numpy(thresholds[name].astype(np.float32)).to(dev)
             for name in names}
    desc = "netdissect " + (", ".join(names) if len(names) <= 3 else f"{len(names)} layers")
    row = rows.start + start
    items = index[row : rows.stop]
    with (progress_bar(len(rows), desc, progress, unit="img", outer=True,
                       initial=start) as bar,
          annotation_batches(dataset, items, batch_size, num_workers=num_workers,
                             cache=opts.annotation_cache) as batches):
        for n_batch, item in enumerate(batches, start=1):
            b = len(item["annotated"])
            first = tallies[names[0]]  # the torch engine cuts label runs once for all layers
            labels = first.label_batch(item["pixel_labels"]) if first.engine == "torch" else None
            for name in names:
                # cast in numpy: a torch cast of a float16 block runs torch's parallel loop,
                # which waits on a parked thread when other jobs share the machine
                maps = torch.from_numpy(np.asarray(store[name][row : row + b],
                                                   dtype=np.float32)).to(dev)
                tallies[name].add(maps, thr_t[name], item["pixel_labels"], item["image_labels"],
                                  item["annotated"], labels=labels)
            row += b
            bar.update(b)
            if n_batch % opts.checkpoint_every == 0 and row < rows.stop:
                save(row - rows.start)
    iou, top = {}, {}
    for name in names:
        tally = tallies[name]
        if ctx is not None:  # exact: int64 counts summed over the ranks
            with ctx.phase("count reduction"):
                tally.load_state_dict(
                    {k: ctx.all_sum(v) for k, v in tally.state_dict().items()}
                )
        iou[name] = tally.result()
        # streamed in chunks (memory bounded by a chunk, not by the store's rows); a
        # non-finite maximum ranks last, as if -inf
        order = top_rows(lambda a, b, layer=name: store.maxima(layer, a, b), len(index),
                         store[name].shape[1], k)
        top[name] = index[order]
    meta = {"store": str(store.path), "model": store.meta.get("model"),
            "stored_dtype": str(stored_dtype), "n_images": int(len(index)),
            "nonfinite": {name: found[name].total for name in names},
            "tokens": stored_layouts(store, names)}
    result = DissectionResult(names, concepts, cats, iou, thresholds, top, quantile=quantile,
                              iou_threshold=iou_threshold, meta=meta)
    if opts.checkpoint is not None:  # a finished run needs no checkpoint
        opts.checkpoint.unlink(missing_ok=True)
    return result


def _thresholds(store: ActivationStore, names: list[str], rows: range, quantile: float,
                dev: torch.device, ctx: DistContext | None
                ) -> tuple[dict[str, np.ndarray], dict[str, NonFiniteTally]]:
    """Every layer's thresholds (each its own exact-quantile pass over the store; the pass
    also counts the non-finite values, which the thresholds leave out, and notes their rows),
    merged over the ranks of ``ctx``."""
    thresholds: dict[str, np.ndarray] = {}
    found: dict[str, NonFiniteTally] = {}

    for name in names:
        ds = store[name]
        n, units, h, w = ds.shape
        # ~4M values per read: bounded working set (and faster than 16M: it stays in cache)
        read = min(len(store), max(1, (1 << 22) // max(1, units * h * w)))
        found[name] = NonFiniteTally(name)
        with ctx.phase("threshold merge") if ctx is not None else nullcontext():
            thresholds[name], _ = exact_quantiles(
                _threshold_batches(ds, rows, read), units, n * h * w, 1 - quantile,
                dtype=np.dtype(ds.dtype), device=dev, collective=ctx, return_nonfinite=True,
                on_nonfinite=_note_rows(found[name], rows, read, (units, h, w)))
        found[name].add_finite(len(rows) - found[name].seen_rows, units, h * w)
    if ctx is not None:  # every rank's rows: the same counts and first rows on every rank
        states = ctx.gather("non-finite counts",
                            {layer: t.state_dict() for layer, t in found.items()})
        found = {layer: merged_tallies([state[layer] for state in states]) for layer in names}
    return thresholds, found
