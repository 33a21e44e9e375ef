"""Stream the activations of chosen layers over a whole dataset into an HDF5 store.

The data side (a resumable stream of batches) is :mod:`.source`, the background writer
:mod:`.async_writer`, the reductions before storing :mod:`.pooling`; the file itself is
:mod:`dissect.store`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._plumbing.checks import positive_int
from .._plumbing.device import PreparedModel, prepare_model
from .._plumbing.fingerprint import fingerprint
from .._plumbing.finite import NonFiniteTally
from .._plumbing.progress import progress_bar
from ..distributed import DistContext, publish_shards, shard_attr, shard_path
from ..distributed import resolve as resolve_distributed
from ..errors import DataError, DissectError, StoreError
from ..store import DTYPES, ActivationStore, StoreWriter, create_store
from ..store.layout import check_destination, io_error
from .async_writer import AsyncWriter
from .data_identity import data_differences, data_identity
from .layers import LayerSelector, resolve_layers
from .outputs import as_rows, sequence_first
from .pooling import Pool, apply_pool, check_pool
from .select import Selector
from .source import BatchSource
from .tokens import TokenGrid, TokensSpec, resolve_tokens
from .trace import Trace

__all__ = ["capture", "fingerprint"]

log = logging.getLogger(__name__)

Target = int | Callable[[torch.Tensor], torch.Tensor]
FP16_MAX = float(np.finfo(np.float16).max)


def _target_scalar(target: Target, output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if callable(target):
        value = target(output)
        if not isinstance(value, torch.Tensor):
            raise DissectError(f"the grads_for callable returned {type(value).__name__}, not "
                               "a tensor of scores")
        return value.sum()
    if not isinstance(output, torch.Tensor) or output.ndim < 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
        raise DissectError(f"grads_for={target} needs (N, classes, ...) model outputs, got "
                           f"{shape}: pass a callable that maps the output to scores")
    if not 0 <= target < output.shape[1]:
        raise DissectError(f"grads_for={target} is out of range: the model has "
                           f"{output.shape[1]} outputs (0..{output.shape[1] - 1})")
    return output[:, target].sum()


@dataclass
class _Job:
    """What one capture writes: the model, the data, the layers and how they are stored."""

    run: PreparedModel
    source: BatchSource
    names: list[str]
    settings: dict[str, Any]
    pool: Pool
    grads_for: Target | None
    progress: bool
    attrs: dict[str, Any]
    identity: dict[str, str]
    seq_first: set[str]
    tokens: dict[str, Any]
    select: Any
    grids: dict[str, TokenGrid]


def _existing(path: Path, job: _Job, resume: bool) -> tuple[ActivationStore | None, int]:
    """Decide what to do with a file already at ``path``: (complete store | None, start row).

    The file must hold the same model (weights fingerprint), layers, dtype, pooling, row
    count and data (:mod:`.data_identity`) as this call; else a :class:`StoreError` lists the
    differences.
    """
    hint = "pass overwrite=True (or --overwrite) to replace it"
    try:
        store = ActivationStore(path)
    except StoreError as exc:
        raise StoreError(f"{exc}; {hint}") from exc
    try:
        meta = store.meta
        diffs = [
            f"{key}: file has {meta.get(key)!r}, this call {value!r}"
            for key, value in job.settings.items()
            if key != "fingerprint" and meta.get(key) != value
        ]
        saved = meta.get("fingerprint")
        if saved != job.settings["fingerprint"]:
            if saved == fingerprint(job.run.module, legacy=True):
                log.info("%s was fingerprinted by torch-dissect 0.1: same model", path)
            else:
                diffs.insert(0, "fingerprint: the weights differ (another model, or other "
                                "weights)")
        if "data_hash" in meta:
            diffs += data_differences(meta, job.identity)
        else:
            log.warning("%s was captured by an earlier release, which did not record its data: "
                        "it cannot be checked against this call's data", path)
        if diffs:
            raise StoreError(
                f"{path} was captured with other settings or data ({'; '.join(diffs)}); "
                f"{hint}, or choose another path"
            )
        if store.complete:
            log.info("%s is already complete; nothing to capture", path)
            return store, store.n_samples
        if not resume:
            raise StoreError(f"{path} is an unfinished capture and resume=False; {hint}")
        start = store.n_written
        log.info("resuming %s at row %d of %d", path, start, store.n_samples)
    except BaseException:
        store.close()
        raise
    store.close()
    return None, start


def _prepare_destination(path: Path) -> None:
    """The folder of a new store exists (a :class:`StoreError` when it cannot)."""
    check_destination(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(path.parent, "making the folder", exc) from exc


def capture(
    model: nn.Module | PreparedModel,
    data: Any,
    layers: LayerSelector,
    path: str | Path,
    *,
    batch_size: int = 64,
    dtype: str = "float16",
    pool: Pool | int = None,
    grads_for: Target | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    distributed: DistContext | bool | None = None,
    dataset: str | None = None,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> ActivationStore:
    """Run ``model`` over ``data`` and stream the chosen layers' activations to an HDF5 store.

    Memory stays bounded by one batch whatever the dataset size: each batch is reduced on the
    device (pooled, cast), handed to a background writer thread (disk writes overlap with the
    next forward pass) and flushed. Without ``grads_for`` the forward pass stops after the last
    requested layer.

    Parameters
    ----------
    model
        The network, or a :class:`~dissect.PreparedModel`. It runs where it is unless
        ``device`` says otherwise (see :func:`dissect.prepare_model`), in eval mode (every
        module's mode is restored afterwards).
    data
        A map-style ``Dataset``, a ``DataLoader`` (``shuffle=False``) or an ``(N, ...)`` tensor.
        Items (or batches) are a tensor, a tuple/list whose first element is the input, or a
        dict with key ``"image"`` (and optionally ``"index"``, stored in ``/index``). Or a
        data-source spec, as the CLI's ``--data`` (:func:`dissect.datasets.resolve_data`):
        ``"synthetic:N"``, ``"samples"``, ``"broden:PATH"``, a folder. A spec is opened
        *without* a transform (images are ``(3, H, W)`` floats in [0, 1]); the CLI applies
        the model's preprocessing, so a Python caller who needs it passes a dataset built
        with ``transform=`` instead. The spec is recorded as ``dataset`` unless that is given.
    layers
        Layer name(s) or a predicate (see :func:`dissect.hooks.layer_names`).
    path
        The HDF5 file to write (parent folders are created).
    batch_size
        Samples per forward pass when ``data`` is a Dataset.
    dtype
        Stored dtype, ``"float16"`` (half the disk; values beyond +-65504 become inf, which is
        logged) or ``"float32"`` (bit-exact). Maxima are always float32.
    pool
        ``None`` (keep maps), ``"mean"`` or ``"max"`` over space, or an output size ``n`` /
        ``(h, w)`` for adaptive average pooling. Maxima are taken before pooling.
    grads_for
        Also store gradients of a target with respect to each layer output under
        ``/gradients``: a class index (the logit summed over the batch) or a callable on the
        model output returning a tensor to sum. Samples are independent in eval mode, so each
        row is that sample's own gradient. Parameter ``.grad`` fields are left untouched.
    device
        ``None``: where the model is. Otherwise inputs go there, and a model on one device
        is moved there (:func:`dissect.prepare_model`).
    num_workers
        DataLoader worker processes when ``data`` is a Dataset.
    progress
        Show a tqdm progress bar.
    resume
        Continue an unfinished compatible file at ``path`` (a complete one is returned as is).
    overwrite
        Replace whatever is at ``path``. Without it, a file captured with another model
        (fingerprint), layer set, dtype, pooling or size is refused.
    distributed
        Multi-process runs (:mod:`dissect.distributed`): ``None`` detects an initialized
        process group or ``torchrun``'s variables, ``False`` forces one process, or pass a
        :class:`~dissect.distributed.DistContext`. Then each rank captures a contiguous shard
        of whole batches into ``<path>.shards/rank{r:05d}-of-{W:05d}.h5`` (resumable on its
        own), rank 0 publishes ``path`` as a virtual store over the shards, and every rank
        returns it: it reads exactly like a single-process store. ``device=None`` (or
        ``"cuda"``) means ``cuda:LOCAL_RANK``; only rank 0 shows a progress bar.
    dataset
        The data-source spec (``"synthetic:1000"``, ``"broden:PATH"``, a folder...), recorded
        as the store's ``dataset`` attribute so later analyses can reopen the same data (e.g.
        ``probe(store, labels="targets")``, ``dissect probe STORE --labels targets``). The CLI
        records its ``--data``; ``None`` records ``data`` itself when it is a spec.
    tokens
        How token outputs are stored (:mod:`dissect.hooks.tokens`): ``"auto"`` (default)
        stores a recognized transformer layer (torchvision's or timm's ViT, Swin) as
        ``(N, C, h, w)`` maps like a convolution's, and refuses an unrecognized 3-D output;
        a :class:`~dissect.hooks.TokenGrid`; ``None`` (store outputs as they are); or
        ``{layer: TokenGrid | None}``. Each layer's layout is recorded (its ``tokens``
        attribute, :meth:`ActivationStore.layout`), and the prefix tokens (class, register
        tokens) are stored under ``/prefix/<layer>`` ``(N, P, C)``
        (:meth:`ActivationStore.prefix`), so no later analysis needs to be told.
    select
        Which tensor of a module returning several is stored (:mod:`dissect.hooks.select`):
        the first (default), an index, a key or a callable; one for every layer or
        ``{layer: selector}``.

    Returns
    -------
    ActivationStore
        The complete store, open for reading.

    Raises
    ------
    DissectError
        For bad arguments, data of an unsupported form, or an incompatible existing file.
    """
    if dtype not in DTYPES:
        raise DissectError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    positive_int(batch_size, "batch_size")
    positive_int(num_workers, "num_workers", minimum=0)
    pool = check_pool(pool)
    if grads_for is not None and not callable(grads_for) and (
        not isinstance(grads_for, int) or isinstance(grads_for, bool) or grads_for < 0
    ):
        raise DissectError(f"grads_for must be a class index (>= 0) or a callable, got "
                           f"{grads_for!r}")
    ctx = resolve_distributed(distributed, device)
    run = prepare_model(model, ctx.device(device) if ctx is not None else device)
    names = resolve_layers(run.module, layers)
    path = Path(path)
    from ..datasets.sources import resolve_data  # here only: importing hooks stays light

    data, spec = resolve_data(data)
    if dataset is None:
        dataset = spec
    source = BatchSource(data, batch_size, num_workers, run.device)
    settings = {
        "fingerprint": run.fingerprint,
        "layers": names,
        "dtype": dtype,
        "pool": list(pool) if isinstance(pool, tuple) else pool,
        "n_samples": source.n,
        "gradients": grads_for is not None,
    }
    identity = data_identity(source, dataset)
    modules = dict(run.module.named_modules())
    layouts = resolve_tokens(run.module, names, tokens)
    grids = {n: g for n, g in layouts.items() if isinstance(g, TokenGrid)}
    # recorded (root attribute, absent when no layer is read as tokens) and compared on reuse
    settings["tokens"] = json.dumps({n: json.loads(g.to_json()) for n, g in grids.items()}) \
        if grids else None
    if grids:
        log.info("reading token outputs as maps: %s",
                 ", ".join(f"{n} {g}" for n, g in grids.items()))
    seq_first = {n for n in names if sequence_first(modules[n]) and n not in grids}
    if seq_first:
        log.info("%s return sequence-first (T, N, ...) outputs: stored as (N, T, ...)",
                 sorted(seq_first))
    job = _Job(run, source, names, settings, pool, grads_for,
               progress and (ctx is None or ctx.is_main),
               {**({"dataset": dataset} if dataset else {}),
                **({"tokens": settings["tokens"]} if grids else {}), **identity}, identity,
               seq_first,
               layouts, select, grids)
    if ctx is not None:
        return _capture_sharded(ctx, job, path, resume, overwrite)
    start = 0
    if path.exists() and not overwrite:
        done, start = _existing(path, job, resume)
        if done is not None:
            return done
    _prepare_destination(path)
    with run.evaluating():
        _write(job, path, start)
    return ActivationStore(path)


def _capture_sharded(ctx: DistContext, job: _Job, path: Path, resume: bool,
                     overwrite: bool) -> ActivationStore:
    """One rank's part of a multi-process capture: its shard, then the published store."""
    settings = job.settings
    prints = ctx.gather("compare the models of the ranks", settings["fingerprint"])
    differ = [r for r, p in enumerate(prints) if p != prints[0]]
    if differ:
        raise DissectError(
            f"ranks {differ} hold another model than rank 0 (the weights' fingerprints differ): "
            "load the same weights on every rank (or seed a random initialization)"
        )
    n, align = job.source.n, job.source.align

    def published() -> bool:
        if not path.exists():
            return False
        if overwrite:
            path.unlink()
            return False
        done, _ = _existing(path, job, resume)
        if done is None:
            raise StoreError(
                f"{path} is an unfinished single-process capture: finish it in one process, or "
                f"pass overwrite=True (--overwrite) to capture it with {ctx.world_size} processes"
            )
        done.close()
        return True

    if ctx.on_main(f"check {path}", published):
        return ActivationStore(path)
    rows = ctx.shard(n, align)
    shard = shard_path(path, ctx.rank, ctx.world_size)
    error: Exception | None = None
    try:
        if rows:
            job.source.restrict(rows)
            info = shard_attr(ctx.rank, ctx.world_size, rows)
            job.settings = {**settings, "n_samples": len(rows), "shard": info}
            job.attrs = {"shard": info, **job.attrs}
            start = 0
            done = None
            if shard.exists() and not overwrite:
                done, start = _existing(shard, job, resume)
            if done is not None:
                done.close()
            else:
                _prepare_destination(shard)
                with job.run.evaluating():
                    _write(job, shard, start)
    except Exception as exc:  # every rank learns of it at the next step
        error = exc
    with ctx.phase("wait for the shards"):
        ctx.agree(f"capture of the shards of {path}", error)
    with ctx.phase("publish"):
        ctx.on_main(f"publish {path}",
                    lambda: str(publish_shards(path, ctx.world_size, n, align)))
    return ActivationStore(path)


def _forward(job: _Job, x: torch.Tensor, reduce: Callable) -> tuple[Trace, dict | None]:
    """One batch through the model: the trace of the reduced outputs (and the gradients)."""
    model, names, pool = job.run.module, job.names, job.pool
    x = job.run.inputs(x)
    if job.grads_for is None:
        with torch.inference_mode(), Trace(model, names, stop=True, record=reduce,
                                           tokens=job.tokens, select=job.select) as tr:
            model(x)
        return tr, None
    torch_dtype = getattr(torch, job.settings["dtype"])
    x = x.detach().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad(), \
            Trace(model, names, grads=True, record=reduce, tokens=job.tokens,
                  select=job.select) as tr:
        target = _target_scalar(job.grads_for, model(x))
        torch.autograd.grad(target, x)
    grads = {}
    for n in names:
        g = tr.grads[n].detach()
        g = g.transpose(0, 1) if n in job.seq_first else g
        g = g[:, None] if g.ndim == 1 else g
        grads[n] = apply_pool(g, pool, n).to(torch_dtype).cpu().numpy()
    return tr, grads


def _write(job: _Job, path: Path, start: int) -> None:
    """Capture the job's rows from ``start`` on into ``path`` (created at the first batch)."""
    names, settings, source = job.names, job.settings, job.source
    torch_dtype = getattr(torch, settings["dtype"])
    batch = [0]  # the current batch's size, read by reduce() inside the forward pass

    def reduce(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = as_rows(name, t.detach(), batch[0], name in job.seq_first, torch_dtype)
        if t.ndim == 1:
            t = t[:, None]
        maxima = t.amax(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t
        act = apply_pool(t, job.pool, name).to(torch_dtype, copy=True)
        return act, maxima.float()

    writer: StoreWriter | None = StoreWriter(path) if start else None
    async_writer = AsyncWriter(writer) if writer else None
    warned = False
    nonfinite = {n: NonFiniteTally(n) for n in names}  # warned about once per layer, at the end
    bar = progress_bar(source.n, f"capture {path.name}", job.progress, unit="img",
                       initial=start, outer=True)
    t0 = time.perf_counter()
    try:
        row = start
        for x, index in source.batches(start):
            batch[0] = len(x)
            tr, grads = _forward(job, x, reduce)
            missing = [n for n in names if n not in tr.outputs]
            if missing:
                raise DissectError(
                    f"layers {missing} did not run during the forward pass (unused modules?)"
                )
            for n in names:  # one sum per layer on finite data (on the device)
                nonfinite[n].add(tr.outputs[n][0], row)
            acts = {n: tr.outputs[n][0].cpu().numpy() for n in names}
            maxima = {n: tr.outputs[n][1].cpu().numpy() for n in names}
            prefix = {n: tr.prefix[n].to(torch_dtype).cpu().numpy() for n in names
                      if n in tr.prefix}
            if not warned and settings["dtype"] == "float16":
                big = [n for n in names if np.abs(maxima[n]).max(initial=0) > FP16_MAX]
                if big:
                    log.warning("activations of %s exceed float16's range and are stored as "
                                "inf; capture with dtype='float32'", big)
                    warned = True
            if async_writer is None:
                module = job.run.module
                create_store(
                    path,
                    n=source.n,
                    layers={n: tuple(acts[n].shape[1:]) for n in names},
                    dtype=settings["dtype"],
                    pool=settings["pool"],
                    gradients=settings["gradients"],
                    tokens={n: g.to_json() for n, g in job.grids.items()},
                    prefix={n: tuple(a.shape[1:]) for n, a in prefix.items()},
                    attrs={
                        "model": f"{type(module).__module__}.{type(module).__qualname__}",
                        "fingerprint": settings["fingerprint"],
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        **job.attrs,
                    },
                )
                writer = StoreWriter(path)
                async_writer = AsyncWriter(writer)
            for n in names:
                if acts[n].shape[1:] != writer.row_shapes[n]:
                    raise DataError(
                        f"layer {n!r} produced rows of shape {acts[n].shape[1:]} at row {row}, "
                        f"earlier rows were {writer.row_shapes[n]}: inputs must all have one size"
                    )
            async_writer.put((row, index.numpy().astype(np.int64), acts, maxima, grads,
                              prefix))
            row += len(x)
            bar.update(len(x))
        if async_writer is not None:
            async_writer.close()
            async_writer = None
        if writer is not None:
            writer.finish()
        for tally in nonfinite.values():
            tally.warn(log)
        log.info("captured %d rows of %s to %s in %.1fs", source.n - start, names, path,
                 time.perf_counter() - t0)
    finally:
        bar.close()
        if async_writer is not None:  # an error or interrupt: keep what was handed over
            try:
                async_writer.close()
            except BaseException as exc:  # the original error matters more
                log.debug("writer error during shutdown: %s", exc)
        if writer is not None:
            writer.close()
