"""Stream the activations of chosen layers over a whole dataset into an HDF5 store."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from tqdm.auto import tqdm

from .._plumbing.device import resolve_device
from ..distributed import DistContext, publish_shards, shard_attr, shard_path
from ..distributed import resolve as resolve_distributed
from ..errors import DataError, DissectError, StoreError
from ..store import DTYPES, ActivationStore, StoreWriter, create_store
from .layers import LayerSelector, resolve_layers
from .trace import Trace

log = logging.getLogger(__name__)

Pool = None | str | int | tuple[int, int]
Target = int | Callable[[torch.Tensor], torch.Tensor]
FP16_MAX = float(np.finfo(np.float16).max)


def fingerprint(model: nn.Module) -> str:
    """Hash a model's architecture and weights (class, names, shapes, dtypes and values).

    Parameters
    ----------
    model
        Any module.

    Returns
    -------
    str
        A hex SHA-256 digest; two models with the same class and state dict share it.
    """
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():  # hash the tensor's own buffer, no bytes copy
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _check_pool(pool: Any) -> Pool:
    if pool is None or pool in ("mean", "max"):
        return pool
    if isinstance(pool, int) and not isinstance(pool, bool) and pool > 0:
        return (pool, pool)
    if (
        isinstance(pool, (tuple, list))
        and len(pool) == 2
        and all(isinstance(p, int) and p > 0 for p in pool)
    ):
        return (int(pool[0]), int(pool[1]))
    raise DissectError(
        f"pool must be None, 'mean', 'max', an output size n or (h, w); got {pool!r}"
    )


def _apply_pool(t: torch.Tensor, pool: Pool, name: str) -> torch.Tensor:
    if pool is None or t.ndim <= 2:
        return t
    dims = tuple(range(2, t.ndim))
    if pool == "mean":
        return t.mean(dim=dims)
    if pool == "max":
        return t.amax(dim=dims)
    if t.ndim != 4:
        raise DissectError(f"layer {name!r}: pooling to a size needs (N, C, H, W) outputs, "
                           f"got shape {tuple(t.shape)}; use pool='mean' or 'max'")
    return F.adaptive_avg_pool2d(t, pool)


def _target_scalar(target: Target, output: torch.Tensor) -> torch.Tensor:
    if callable(target):
        value = target(output)
    elif isinstance(target, int) and not isinstance(target, bool):
        value = output[:, target]
    else:
        raise DissectError(f"grads_for must be a class index or a callable, got {target!r}")
    return value.sum()


class _Inputs(Dataset):
    """Wrap a dataset so each item becomes ``(input tensor, dataset index)``."""

    def __init__(self, dataset: Any, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pos = self.start + i
        x, index = _split(self.dataset[pos], pos, batched=False)
        return x, int(index)


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise DataError(
        f"{what} is a {type(x).__name__}, not a tensor: give the dataset a transform that "
        "returns a float tensor (e.g. the transform from dissect.models.load_model)"
    )


def _split(item: Any, position: Any, batched: bool) -> tuple[torch.Tensor, Any]:
    """Extract ``(input, index)`` from a data item or batch."""
    what = "a batch" if batched else "a data item"
    index = position
    if isinstance(item, dict):
        if "image" not in item:
            raise DataError(f"{what} is a dict without an 'image' key (keys: {sorted(item)})")
        x = item["image"]
        if "index" in item:
            index = item["index"]
    elif isinstance(item, (tuple, list)):
        if not item:
            raise DataError(f"{what} is an empty {type(item).__name__}")
        x = item[0]
    else:
        x = item
    return _as_tensor(x, f"the input of {what}"), index


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(x.shape) for x, _ in items}
    if len(shapes) > 1:
        raise DataError(
            f"data items have different shapes {sorted(shapes)}: resize them to one size "
            "(e.g. set the dataset's transform)"
        )
    return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items])


def _loader_rows(loader: DataLoader) -> int:
    if loader.batch_size is None:
        return sum(len(b) for b in loader.batch_sampler)
    if loader.drop_last:
        return len(loader) * loader.batch_size
    return len(loader.sampler)


def _sequential(loader: DataLoader) -> bool:
    """True for a loader that reads its dataset in order in batches of ``batch_size``."""
    return (
        loader.batch_size is not None
        and type(loader.batch_sampler) is BatchSampler
        and type(loader.sampler) is SequentialSampler
    )


def _subset_loader(loader: DataLoader, start: int, stop: int) -> DataLoader:
    """The same loader over rows ``start:stop`` of its dataset only (a rank's shard)."""
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}
    return DataLoader(
        Subset(loader.dataset, range(start, stop)),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        **extra,
    )


class _Source:
    """A sized, deterministic stream of ``(inputs, indices)`` batches that can start at a row."""

    def __init__(self, data: Any, batch_size: int, num_workers: int, device: torch.device):
        if isinstance(data, torch.Tensor):
            data = TensorDataset(data)
        self.data, self.batch_size, self.num_workers = data, batch_size, num_workers
        self.pin = device.type == "cuda"
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise DataError("capture needs a sized, map-style dataset, not an IterableDataset")
            if isinstance(data.sampler, RandomSampler):
                raise DataError(
                    "capture needs a deterministic order to be resumable: build the DataLoader "
                    "with shuffle=False (rows are stored in the loader's order)"
                )
            self.n = _loader_rows(data)
        elif isinstance(data, IterableDataset) or not hasattr(data, "__getitem__"):
            raise DataError(
                f"data must be a map-style Dataset, a DataLoader or a tensor, not "
                f"{type(data).__name__}"
            )
        else:
            try:
                self.n = len(data)
            except TypeError as exc:
                raise DataError("data must have a length (len(dataset))") from exc
        if self.n == 0:
            raise DataError("the data source is empty: nothing to capture")
        self.offset = 0  # first row read (a rank's shard starts later)
        loader_batch = data.batch_size if isinstance(data, DataLoader) else batch_size
        self.align = loader_batch or 1  # shards are cut at multiples of this

    def restrict(self, rows: range) -> None:
        """Read only ``rows``, a contiguous range of the source's rows (one rank's shard)."""
        self.offset, self.n = rows.start, len(rows)

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = self.offset + start, self.offset + self.n
        if not isinstance(self.data, DataLoader):
            loader = DataLoader(
                _Inputs(self.data, lo, hi),
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=_collate,
                pin_memory=self.pin,
            )
            yield from loader
            return
        data, row = self.data, 0
        if self.offset and _sequential(data):  # a shard of a plain loader: read only its rows
            data, row = _subset_loader(data, self.offset, hi), self.offset
        elif self.offset:
            log.info("the loader is not sequential: re-reading (not computing) the %d rows "
                     "before this shard", self.offset)
        if start:
            log.info("resuming a DataLoader source: re-reading (not recomputing) %d rows", start)
        for batch in data:
            x, index = _split(batch, None, batched=True)
            b = len(x)
            index = torch.arange(row, row + b) if index is None else torch.as_tensor(index)
            if row + b > lo:
                skip, keep = max(0, lo - row), min(b, hi - row)
                yield x[skip:keep], index[skip:keep]
            row += b
            if row >= hi:
                break


class _AsyncWriter:
    """Write batches on a background thread so disk I/O overlaps with the next forward pass."""

    def __init__(self, writer: StoreWriter, depth: int = 2) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dissect-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # re-raised in the caller's thread
                    self.error = exc

    def put(self, item: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        """Drain the queue (every batch handed over is written), then stop."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _existing(
    path: Path, settings: dict[str, Any], resume: bool
) -> tuple[ActivationStore | None, int]:
    """Decide what to do with a file already at ``path``: (complete store | None, start row)."""
    hint = "pass overwrite=True (or --overwrite) to replace it"
    try:
        store = ActivationStore(path)
    except StoreError as exc:
        raise StoreError(f"{exc}; {hint}") from exc
    try:
        meta = store.meta
        diffs = [
            f"{key}: file has {meta.get(key)!r}, this call {value!r}"
            for key, value in settings.items()
            if meta.get(key) != value
        ]
        if diffs:
            raise StoreError(
                f"{path} was captured with other settings ({'; '.join(diffs)}); "
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


def capture(
    model: nn.Module,
    data: Any,
    layers: LayerSelector,
    path: str | Path,
    *,
    batch_size: int = 64,
    dtype: str = "float16",
    pool: Pool = None,
    grads_for: Target | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    distributed: DistContext | bool | None = None,
    dataset: str | None = None,
) -> ActivationStore:
    """Run ``model`` over ``data`` and stream the chosen layers' activations to an HDF5 store.

    Memory stays bounded by one batch whatever the dataset size: each batch is reduced on the
    device (pooled, cast), handed to a background writer thread (disk writes overlap with the
    next forward pass) and flushed. Without ``grads_for`` the forward pass stops after the last
    requested layer. The model runs in eval mode (its mode is restored afterwards).

    Parameters
    ----------
    model
        The network. It is moved to ``device``.
    data
        A map-style ``Dataset``, a ``DataLoader`` (``shuffle=False``) or an ``(N, ...)`` tensor.
        Items (or batches) are a tensor, a tuple/list whose first element is the input, or a
        dict with key ``"image"`` (and optionally ``"index"``, stored in ``/index``).
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
        ``None`` for CUDA when available, else CPU.
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
        ``dissect probe STORE --labels targets``). The CLI records its ``--data``.

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
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DissectError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DissectError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    pool = _check_pool(pool)
    if grads_for is not None and not callable(grads_for) and (
        not isinstance(grads_for, int) or isinstance(grads_for, bool)
    ):
        raise DissectError(f"grads_for must be a class index or a callable, got {grads_for!r}")
    names = resolve_layers(model, layers)
    ctx = resolve_distributed(distributed, device)
    dev = ctx.device(device) if ctx is not None else resolve_device(device)
    path = Path(path)
    source = _Source(data, batch_size, num_workers, dev)
    model.to(dev)
    settings = {
        "fingerprint": fingerprint(model),
        "layers": names,
        "dtype": dtype,
        "pool": list(pool) if isinstance(pool, tuple) else pool,
        "n_samples": source.n,
        "gradients": grads_for is not None,
    }
    if ctx is not None:
        return _capture_sharded(ctx, model, source, names, path, settings, pool, grads_for, dev,
                                progress and ctx.is_main, resume, overwrite, dataset)
    start = 0
    if path.exists() and not overwrite:
        done, start = _existing(path, settings, resume)
        if done is not None:
            return done
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        _run(model, source, names, path, start, settings, pool, grads_for, dev, progress,
             attrs={"dataset": dataset} if dataset else None)
    finally:
        model.train(was_training)
    return ActivationStore(path)


def _capture_sharded(
    ctx: DistContext,
    model: nn.Module,
    source: _Source,
    names: list[str],
    path: Path,
    settings: dict[str, Any],
    pool: Pool,
    grads_for: Target | None,
    dev: torch.device,
    progress: bool,
    resume: bool,
    overwrite: bool,
    dataset: str | None = None,
) -> ActivationStore:
    """One rank's part of a multi-process capture: its shard, then the published store."""
    prints = ctx.gather("compare the models of the ranks", settings["fingerprint"])
    differ = [r for r, p in enumerate(prints) if p != prints[0]]
    if differ:
        raise DissectError(
            f"ranks {differ} hold another model than rank 0 (the weights' fingerprints differ): "
            "load the same weights on every rank (or seed a random initialization)"
        )
    n, align = source.n, source.align

    def published() -> bool:
        if not path.exists():
            return False
        if overwrite:
            path.unlink()
            return False
        done, _ = _existing(path, settings, resume)
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
            source.restrict(rows)
            info = shard_attr(ctx.rank, ctx.world_size, rows)
            shard_settings = {**settings, "n_samples": len(rows), "shard": info}
            start = 0
            done = None
            if shard.exists() and not overwrite:
                done, start = _existing(shard, shard_settings, resume)
            if done is not None:
                done.close()
            else:
                shard.parent.mkdir(parents=True, exist_ok=True)
                was_training = model.training
                model.eval()
                try:
                    _run(model, source, names, shard, start, shard_settings, pool, grads_for,
                         dev, progress,
                         attrs={"shard": info, **({"dataset": dataset} if dataset else {})})
                finally:
                    model.train(was_training)
    except Exception as exc:  # every rank learns of it at the next step
        error = exc
    with ctx.phase("wait for the shards"):
        ctx.agree(f"capture of the shards of {path}", error)
    with ctx.phase("publish"):
        ctx.on_main(f"publish {path}",
                    lambda: str(publish_shards(path, ctx.world_size, n, align)))
    return ActivationStore(path)


def _run(
    model: nn.Module,
    source: _Source,
    names: list[str],
    path: Path,
    start: int,
    settings: dict[str, Any],
    pool: Pool,
    grads_for: Target | None,
    dev: torch.device,
    progress: bool,
    attrs: dict[str, Any] | None = None,
) -> None:
    torch_dtype = getattr(torch, settings["dtype"])

    def reduce(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.detach()
        if t.ndim == 1:
            t = t[:, None]
        maxima = t.amax(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t
        act = _apply_pool(t, pool, name).to(torch_dtype, copy=True)
        return act, maxima.float()

    writer: StoreWriter | None = StoreWriter(path) if start else None
    async_writer = _AsyncWriter(writer) if writer else None
    warned = False
    bar = tqdm(total=source.n, initial=start, unit="img", disable=not progress,
               desc=f"capture {path.name}")
    t0 = time.perf_counter()
    try:
        row = start
        for x, index in source.batches(start):
            x = x.to(dev, non_blocking=True)
            grads = None
            if grads_for is None:
                with torch.inference_mode(), Trace(model, names, stop=True, record=reduce) as tr:
                    model(x)
            else:
                x = x.detach().float().requires_grad_(True)
                with Trace(model, names, grads=True, record=reduce) as tr:
                    target = _target_scalar(grads_for, model(x))
                    torch.autograd.grad(target, x)
                grads = {
                    n: _apply_pool(tr.grads[n].detach(), pool, n).to(torch_dtype).cpu().numpy()
                    for n in names
                }
            missing = [n for n in names if n not in tr.outputs]
            if missing:
                raise DissectError(
                    f"layers {missing} did not run during the forward pass (unused modules?)"
                )
            acts = {n: tr.outputs[n][0].cpu().numpy() for n in names}
            maxima = {n: tr.outputs[n][1].cpu().numpy() for n in names}
            if not warned and settings["dtype"] == "float16":
                big = [n for n in names if np.abs(maxima[n]).max(initial=0) > FP16_MAX]
                if big:
                    log.warning("activations of %s exceed float16's range and are stored as "
                                "inf; capture with dtype='float32'", big)
                    warned = True
            if async_writer is None:
                create_store(
                    path,
                    n=source.n,
                    layers={n: tuple(acts[n].shape[1:]) for n in names},
                    dtype=settings["dtype"],
                    pool=settings["pool"],
                    gradients=settings["gradients"],
                    attrs={
                        "model": f"{type(model).__module__}.{type(model).__qualname__}",
                        "fingerprint": settings["fingerprint"],
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        **(attrs or {}),
                    },
                )
                writer = StoreWriter(path)
                async_writer = _AsyncWriter(writer)
            for n in names:
                if acts[n].shape[1:] != writer.row_shapes[n]:
                    raise DataError(
                        f"layer {n!r} produced rows of shape {acts[n].shape[1:]} at row {row}, "
                        f"earlier rows were {writer.row_shapes[n]}: inputs must all have one size"
                    )
            async_writer.put((row, index.numpy().astype(np.int64), acts, maxima, grads))
            row += len(x)
            bar.update(len(x))
        if async_writer is not None:
            async_writer.close()
            async_writer = None
        if writer is not None:
            writer.finish()
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
