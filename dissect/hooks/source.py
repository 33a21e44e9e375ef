"""The data side of :func:`~dissect.hooks.capture`: a sized, deterministic stream of batches.

A capture must be resumable, so its data must come in one fixed order and be able to start at
any row: a map-style ``Dataset`` (read through a ``DataLoader`` of our own), a ``DataLoader``
that does not shuffle, or a tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
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

from .._plumbing.items import split_item, stack_inputs
from ..errors import DataError

log = logging.getLogger("dissect.hooks.capture")


class _Inputs(Dataset):
    """Wrap a dataset so each item becomes ``(input tensor, dataset index)``."""

    def __init__(self, dataset: Any, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pos = self.start + i
        x, index = split_item(self.dataset[pos], pos)
        return x, int(index)


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return stack_inputs([x for x, _ in items]), torch.tensor([i for _, i in items])


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


def _on_cpu(dataset: Any) -> bool:
    """Whether the dataset's first item holds its input in CPU memory (pinnable)."""
    try:
        x, _ = split_item(dataset[0], 0)
    except Exception:  # noqa: BLE001 - the real read reports any error with its context
        return False
    return x.device.type == "cpu"


class BatchSource:
    """A sized, deterministic stream of ``(inputs, indices)`` batches that can start at a row.

    Parameters
    ----------
    data
        A map-style ``Dataset``, a ``DataLoader`` (``shuffle=False``) or an ``(N, ...)`` tensor.
    batch_size
        Rows per batch when ``data`` is a Dataset or a tensor.
    num_workers
        DataLoader worker processes when ``data`` is a Dataset or a tensor.
    device
        Where the batches go: host memory is pinned for a CUDA device, but only when the
        items are CPU tensors (tensors already on the GPU cannot be pinned).
    """

    def __init__(self, data: Any, batch_size: int, num_workers: int, device: torch.device):
        if isinstance(data, torch.Tensor):
            data = TensorDataset(data)
        self.data, self.batch_size, self.num_workers = data, batch_size, num_workers
        self.pin = False
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise DataError("capture needs a sized, map-style dataset, not an IterableDataset")
            if isinstance(data.sampler, RandomSampler):
                raise DataError(
                    "capture needs a deterministic order to be resumable: build the DataLoader "
                    "with shuffle=False (rows are stored in the loader's order)"
                )
            self.n = _loader_rows(data)
        elif isinstance(data, (str, bytes)):  # never a sequence of characters as data items
            raise DataError(f"data {data!r:.80} is a string: open data-source specs with "
                            "dissect.datasets.resolve_data (capture and the analyses do)")
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
            self.pin = device.type == "cuda" and self.n > 0 and _on_cpu(data)
        if self.n == 0:
            raise DataError("the data source is empty: nothing to capture")
        self.offset = 0  # first row read (a rank's shard starts later)
        loader_batch = data.batch_size if isinstance(data, DataLoader) else batch_size
        self.align = loader_batch or 1  # shards are cut at multiples of this

    def identity_rows(self) -> list[tuple[int, torch.Tensor]]:
        """The inputs of a few fixed rows, read directly: the first, quarter, middle,
        three-quarter and last rows of a dataset (five items), the first row of a
        ``DataLoader`` (which cannot seek). See :mod:`.data_identity`."""
        if isinstance(self.data, DataLoader):
            x, _ = split_item(next(iter(self.data)), None, batched=True)
            return [(0, x[0])]
        n = self.n
        rows = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
        return [(r, split_item(self.data[r], r)[0]) for r in rows]

    def restrict(self, rows: range) -> None:
        """Read only ``rows``, a contiguous range of the source's rows (one rank's shard)."""
        self.offset, self.n = rows.start, len(rows)

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(inputs, indices)`` batches from row ``start`` (of this source's rows) on."""
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
            x, index = split_item(batch, None, batched=True)
            b = len(x)
            index = torch.arange(row, row + b) if index is None else torch.as_tensor(index)
            if row + b > lo:
                skip, keep = max(0, lo - row), min(b, hi - row)
                yield x[skip:keep], index[skip:keep]
            row += b
            if row >= hi:
                break
