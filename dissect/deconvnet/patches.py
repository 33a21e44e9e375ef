"""Zeiler & Fergus's top patches: each unit's strongest images, projected and cropped."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._plumbing.checks import positive_int, unit_list, units_in_range
from .._plumbing.device import PreparedModel, prepared
from .._plumbing.items import split_item, stack_inputs
from .._plumbing.progress import progress_bar
from ..datasets.sources import resolve_data
from ..errors import DataError, DissectError, StoreError
from ..hooks.select import Selector
from ..hooks.tokens import UNRECOGNIZED, TokensSpec
from ..stats import top_rows
from ..store import ActivationStore
from ._common import Layer, check_method, one_layer, same_layout
from ._rules import report_others
from .projection import argmax_positions, backproject, layer_output, spike_signal
from .receptive import ReceptiveField, receptive_field
from .result import Patch, TopPatches

log = logging.getLogger("dissect.deconvnet")

RTOL = 1e-3  # a cropped forward pass must give the unit's value to this relative tolerance


# --------------------------------------------------------------------------- data


class _Rows(Dataset):
    def __init__(self, dataset: Any, rows: Sequence[int]) -> None:
        self.dataset, self.rows = dataset, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int]:
        row = self.rows[k]
        x, index = split_item(self.dataset[row], row, float_only=True)
        return x, int(index), row


def _collate(items: list) -> tuple[torch.Tensor, list[int], list[int]]:
    return (stack_inputs([x for x, _, _ in items]), [i for _, i, _ in items],
            [r for _, _, r in items])


def _batches(dataset: Any, rows: Sequence[int], batch_size: int, num_workers: int,
             ) -> Iterator[tuple[torch.Tensor, list[int], list[int]]]:
    yield from DataLoader(_Rows(dataset, rows), batch_size=batch_size, shuffle=False,
                          num_workers=num_workers, collate_fn=_collate)


# --------------------------------------------------------------------------- passes


@dataclass
class _Scan:
    values: torch.Tensor  # (n, U) max of each unit per image
    flat: torch.Tensor  # (n, U) flat arg-max position
    index: list[int]  # each scanned row's item index
    input_shape: tuple[int, ...]
    spatial: tuple[int, ...]


def _scan(model: nn.Module, layer: Layer, dataset: Any, rows: Sequence[int],
          units: list[int], batch_size: int, num_workers: int, placed: PreparedModel,
          progress: bool, desc: str, method: str) -> _Scan:
    """Max value and arg-max position of each unit on each row (a forward pass, no graph).

    The first batch also checks that ``method``'s rule applies to the network, so that a
    refusal comes before the pass over the dataset, not after it.
    """
    name = layer.name
    dev = placed.device
    values, flats, index = [], [], []
    shape: tuple[int, ...] | None = None
    spatial: tuple[int, ...] = ()
    unit_index = torch.tensor(units, device=dev)
    with progress_bar(math.ceil(len(rows) / batch_size), desc, progress) as bar:
        for x, idx, _ in _batches(dataset, rows, batch_size, num_workers):
            if shape is None:
                shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != shape:
                raise DataError(f"data items have different shapes {shape} and "
                                f"{tuple(x.shape[1:])}: resize them to one size")
            out = layer_output(model, layer, placed.inputs(x), None if values else method)
            if not values:
                units_in_range(units, out.shape[1], name)
                spatial = tuple(out.shape[2:])
            maps = out.index_select(1, unit_index)  # (b, U, *spatial)
            v, f = argmax_positions(maps.reshape(-1, *spatial))
            values.append(v.view(len(x), len(units)).float().cpu())
            flats.append(f.view(len(x), len(units)).cpu())
            index.extend(idx)
            bar.update(1)
    assert shape is not None
    return _Scan(torch.cat(values), torch.cat(flats), index, shape, spatial)


@dataclass
class _Pair:
    slot: int  # position in the flattened (U, k) result
    unit: int
    row: int
    value: float
    position: tuple[int, ...]
    crop: tuple[int, int, int, int]
    window: tuple[int, int, int, int]


def _project_pairs(model: nn.Module, layer: Layer, dataset: Any,
                   pairs: list[_Pair], field: ReceptiveField, method: str, batch_size: int,
                   num_workers: int, placed: PreparedModel, images: torch.Tensor,
                   projections: torch.Tensor, others: Counter, progress: bool) -> list[_Pair]:
    """Project every pair on its crop, batching pairs of one crop shape; return misfits.

    Each image is read once; its pairs' crops wait in a queue per crop shape until a batch
    is full. A pair whose cropped forward pass does not reproduce the unit's value (a network
    that is not translation-covariant), or that the model refuses to run (a model taking one
    input size only), is returned, to be redone on the full image.
    """
    name = layer.name
    by_row: dict[int, list[_Pair]] = {}
    for p in pairs:
        by_row.setdefault(p.row, []).append(p)
    queues: dict[tuple[int, ...], list[tuple[_Pair, torch.Tensor]]] = {}
    misfits: list[_Pair] = []
    refused: set[tuple[int, ...]] = set()  # crop shapes the model does not run on
    stride = field.stride
    dev = placed.device

    def run(queue: list[tuple[_Pair, torch.Tensor]]) -> None:
        batch = [p for p, _ in queue]
        x = placed.inputs(torch.stack([c for _, c in queue]))
        units = torch.tensor([p.unit for p in batch], device=dev)
        expected = torch.tensor([p.value for p in batch], device=dev)
        bad = torch.zeros(len(batch), dtype=torch.bool)

        def make(out: torch.Tensor) -> torch.Tensor:
            nonlocal bad
            rows = torch.arange(len(batch), device=dev)
            if len(field_spatial := out.shape[2:]) == 2:
                local = [(p.position[0] - p.crop[0] // stride[0],
                          p.position[1] - p.crop[2] // stride[1]) for p in batch]
                flat = torch.tensor([i * field_spatial[1] + j for i, j in local], device=dev)
            else:
                flat = torch.zeros(len(batch), dtype=torch.int64, device=dev)
            got = out.detach().reshape(len(batch), out.shape[1], -1)[rows, units, flat]
            scale = float(expected.abs().max()) + 1e-12
            rtol = max(RTOL, 8 * torch.finfo(got.dtype).eps)  # bfloat16 rounds at 4e-3
            bad = (~torch.isclose(got, expected.to(got.dtype), rtol=rtol,
                                  atol=rtol * 1e-1 * scale)).cpu()
            return spike_signal(out, units, "max", flat)

        whole = all(p.crop == (0, field.input_size[0], 0, field.input_size[1]) for p in batch)
        shape = tuple(x.shape[1:])
        if shape in refused:
            misfits.extend(batch)
            bar.update(len(batch))
            return
        try:
            (grads,) = backproject(model, layer, x, method, [make], others)
        except (DissectError, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a crop the model refuses: redo it whole
            if whole:
                raise
            log.info("the model does not run on %s crops (%s: %s); they are redone on the "
                     "whole images", shape, type(exc).__name__, exc)
            refused.add(shape)
            misfits.extend(batch)
            bar.update(len(batch))
            return
        grads = grads.detach().cpu()
        for n, p in enumerate(batch):
            if bad[n]:
                misfits.append(p)
                continue
            _paste(projections, p, grads[n])
        bar.update(len(batch))

    with progress_bar(len(pairs), f"{method} patches {name}", progress, unit="patch") as bar:
        for x, _, rows in _batches(dataset, sorted(by_row), batch_size, num_workers):
            for image, row in zip(x, rows, strict=True):
                for p in by_row[row]:
                    y0, y1, x0, x1 = p.window
                    images.view(-1, *images.shape[2:])[p.slot] = image[:, y0:y1, x0:x1]
                    c = p.crop
                    crop = image[:, c[0]:c[1], c[2]:c[3]]
                    queue = queues.setdefault(tuple(crop.shape), [])
                    queue.append((p, crop))
                    if len(queue) >= batch_size:
                        run(queue)
                        queue.clear()
        for queue in queues.values():
            if queue:
                run(queue)
    return misfits


def _paste(projections: torch.Tensor, p: _Pair, grad: torch.Tensor) -> None:
    """Copy the part of a crop's projection that falls in the pair's window."""
    target = projections.view(-1, *projections.shape[2:])[p.slot]
    target.zero_()
    cy0, cy1, cx0, cx1 = p.crop
    wy0, wy1, wx0, wx1 = p.window
    y0, y1, x0, x1 = max(cy0, wy0), min(cy1, wy1), max(cx0, wx0), min(cx1, wx1)
    if y0 < y1 and x0 < x1:
        target[:, y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = grad[:, y0 - cy0:y1 - cy0,
                                                                 x0 - cx0:x1 - cx0]


def _store_layout(store: ActivationStore, layer: Layer) -> Layer:
    """``layer`` read as the store read it at capture: its recorded token layout.

    A layout that ``tokens="auto"`` left unrecognized is taken from the store (it records
    what was passed to :func:`~dissect.capture`); any other difference is an error, since the
    store's maxima would then be of other units than the ones projected.
    """
    stored = store.layout(layer.name)
    if layer.layout == UNRECOGNIZED and stored is not None:
        log.info("layer %r: reading its tokens as the store records them (%s)", layer.name,
                 stored)
        return layer.with_layout(stored)
    if not same_layout(layer.layout, stored):
        mine = None if layer.layout == UNRECOGNIZED else layer.layout
        raise StoreError(
            f"{store.path} stored layer {layer.name!r} read as {stored} but this call reads it "
            f"as {mine}: its maxima would be of other units. Pass tokens= as at capture "
            f"(tokens={{{layer.name!r}: {stored}}}), or store=None to scan the dataset")
    return layer


def _store_maxima(store: ActivationStore, name: str, units: list[int], dataset: Any,
                  run: PreparedModel) -> tuple[Callable[[int, int], np.ndarray], int]:
    """A reader of the store's per-image maxima of ``units`` (rows are dataset positions):
    ``read(start, stop)`` gives rows ``[start, stop)``; and the number of rows."""
    saved = store.meta.get("fingerprint")
    if saved is not None and saved != run.fingerprint:
        raise StoreError(
            f"{store.path} was captured from another model (or other weights) than this one: "
            "capture a store of this model, or pass store=None to scan the dataset")
    n = len(store)
    units_in_range(units, store.maxima(name, 0, 1).shape[1], name)
    if not store.complete:
        log.warning("%s is incomplete: using its %d written rows", store.path, n)
    if n > len(dataset):
        raise DataError(f"{store.path} has {n} rows but the dataset only "
                        f"{len(dataset)} items: pass the dataset the store was captured from")
    return (lambda start, stop: np.asarray(store.maxima(name, start, stop))[:, units]), n


def top_patches(
    model: nn.Module,
    dataset: Any,
    layer: str,
    units: int | Sequence[int] | torch.Tensor,
    *,
    k: int = 9,
    store: ActivationStore | None = None,
    method: str = "deconvnet",
    batch_size: int = 64,
    crop: bool = True,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> TopPatches:
    """Each unit's top-k images with their projections, cropped to its receptive field.

    Zeiler & Fergus's Fig. 2: for every unit, the ``k`` dataset images on which its maximal
    activation is largest; for each, the projection of that maximum (:func:`reconstruct`
    with ``location="max"``) and the image patch, both cut to the same window: the receptive
    field of the position of the maximum (:func:`receptive_field`, exact), of one shape for
    the whole layer, shifted inward at the image border.

    Vision Transformers: a token layer is read as the map of its patch grid (``tokens=``),
    and a unit is a hidden dimension. From the first attention on, every token depends on
    every pixel: the receptive field is global, so each "patch" is the whole image (and its
    projection the whole image's), never a crop that would hide part of what drove the unit;
    :attr:`Patch.position` still says which patch token held the maximum. Before the first
    attention (the patch embedding, the first block's ``ln_1``) the field is the token's own
    patch. Token layers are projected on whole images (``crop`` does not apply: position
    embeddings make a crop compute something else). ``method="deconvnet"`` and ``"guided"``
    are refused for networks without rectifiers (GELU ViTs): use ``"gradient"``.

    Parameters
    ----------
    model
        The network (eval mode inside, modes restored; moved to ``device``).
    dataset
        A map-style dataset of model inputs: items are a tensor, a tuple whose first element
        is one, or a dict with ``"image"`` (and optionally ``"index"``). All of one shape.
        Or a data-source spec as the CLI's ``--data`` (``"synthetic:N"``, ``"samples"``,
        ``"broden:PATH"``, a folder; :func:`dissect.datasets.resolve_data`), opened without a
        transform: pass a dataset built with the model's preprocessing when it needs one.
    layer
        The layer name.
    units
        Unit indices of the layer.
    k
        Images per unit (at most the dataset's size).
    store
        An :class:`~dissect.ActivationStore` of this model over this dataset holding
        ``layer``: its per-image maxima choose the top images without a pass over the whole
        dataset (only the chosen images are run, to find where the maxima are). ``None``:
        one forward pass over the dataset (no gradients) finds them.
    method
        ``"deconvnet"``, ``"guided"`` or ``"gradient"`` (see :func:`reconstruct`).
    batch_size
        Images (or crops) per forward pass.
    crop
        Compute each projection on the smallest stride-aligned crop of the image that holds
        the receptive field instead of the whole image. Exact for convolutional networks (the
        unit depends on nothing else, and the crop keeps every layer's grid and the image
        border's padding); each crop is checked to reproduce the unit's value, and a pair
        that does not (a network that is not translation-covariant) is recomputed on the
        whole image. Much faster for early and middle layers.
    device
        Where to compute (as in :func:`reconstruct`).
    num_workers
        DataLoader worker processes for reading the dataset.
    progress
        Show progress bars.
    tokens, select
        How the layer's output is read (token grids, which tensor of several), as in
        :func:`reconstruct`. With ``store``, a layer that ``"auto"`` does not recognize is
        read as the store records it; a layout other than the store's is an error.

    Returns
    -------
    TopPatches
        With ``images`` and ``projections`` of shape ``(U, k, C, h, w)`` on the CPU.

    Notes
    -----
    Ties between images are broken by the lower dataset position, ties between positions
    of one map by the first in row-major order.

    Examples
    --------
    >>> model, transform = load_model("mobilenet_v2-imagenet")            # doctest: +SKIP
    >>> top = top_patches(model, SampleImages(transform), "features.7", range(16), k=4)
    >>> save_patch_grid(top, "features7.png", transform=transform)        # doctest: +SKIP
    """
    dataset, _ = resolve_data(dataset)
    method = check_method(method)
    units = unit_list(units)
    k = positive_int(k, "k")
    batch_size = positive_int(batch_size, "batch_size")
    target = one_layer(model, layer, tokens, select)
    if store is not None:
        if not isinstance(store, ActivationStore):
            raise DissectError(f"store must be an ActivationStore, not {type(store).__name__}")
        target = _store_layout(store, target)
    name = target.name
    if crop and target.is_tokens:
        log.info("layer %r is a token layer: projecting on whole images (crops would shift "
                 "the patches under the position embeddings)", name)
        crop = False
    try:
        n = len(dataset)
    except TypeError:
        raise DataError("dataset must be a sized, map-style dataset (len(dataset))") from None
    if n == 0:
        raise DataError("the dataset is empty")
    others: Counter[str] = Counter()
    with prepared(model, device) as run:
        model = run.module
        if store is None:
            scan = _scan(model, target, dataset, range(n), units, batch_size,
                         num_workers, run, progress, f"maxima {name}", method)
            values = scan.values.numpy()
            read, n_rows = (lambda start, stop: values[start:stop]), len(values)
        else:
            read, n_rows = _store_maxima(store, name, units, dataset, run)
        k = min(k, n_rows)
        # (k, U), streamed over the rows: memory bounded by a chunk of the store
        order = torch.from_numpy(top_rows(read, n_rows, len(units), k).T)
        chosen = sorted(set(order.flatten().tolist()))
        if store is not None:  # positions (and exact values) of the chosen images only
            scan = _scan(model, target, dataset, chosen, units, batch_size, num_workers,
                         run, progress, f"positions {name}", method)
            at = {row: n for n, row in enumerate(chosen)}
        else:
            at = {row: row for row in chosen}
        if len(scan.spatial) not in (0, 2) or len(scan.input_shape) != 3:
            raise DissectError(
                f"top_patches needs (C, H, W) inputs and a layer with 2-D maps or none; got "
                f"inputs {scan.input_shape} and maps {scan.spatial}")
        field = receptive_field(
            run, name, scan.input_shape, tokens={name: target.layout},
            select=None if target.selector is None else {name: target.selector})
        full = (0, scan.input_shape[1], 0, scan.input_shape[2])
        pairs, patches = [], []
        for u_pos, unit in enumerate(units):
            unit_patches = []
            for rank in range(k):
                row = int(order[rank, u_pos])
                r = at[row]
                value = float(scan.values[r, u_pos])
                flat = int(scan.flat[r, u_pos])
                position = divmod(flat, scan.spatial[1]) if scan.spatial else ()
                ij = position if position else (0, 0)
                box, window = field.box(*ij), field.window(*ij)
                pairs.append(_Pair(u_pos * k + rank, unit, row, value, tuple(position),
                                   field.crop(*ij) if crop else full, window))
                unit_patches.append(Patch(unit, rank, row, scan.index[r], value,
                                          tuple(position), box, window))
            patches.append(unit_patches)
        wy0, wy1, wx0, wx1 = pairs[0].window
        shape = (len(units), k, scan.input_shape[0], wy1 - wy0, wx1 - wx0)
        images, projections = torch.zeros(shape), torch.zeros(shape)
        misfits = _project_pairs(model, target, dataset, pairs, field, method,
                                 batch_size, num_workers, run, images, projections, others,
                                 progress)
        if misfits:
            log.warning(
                "%d of %d crops of %r did not reproduce the unit's value (a network that is "
                "not translation-covariant?) or could not be run; recomputing them on the "
                "whole image (crop=False skips the crops)", len(misfits), len(pairs), name)
            redo = [_Pair(p.slot, p.unit, p.row, p.value, p.position, full, p.window)
                    for p in misfits]
            left = _project_pairs(model, target, dataset, redo, field, method,
                                  batch_size, num_workers, run, images, projections, others,
                                  progress)
            if left:
                raise DissectError(
                    f"the forward pass of {left[0].row} no longer gives unit {left[0].unit}'s "
                    f"value {left[0].value:.6g}: is the model or the dataset random?")
    report_others(others, method)
    return TopPatches(name, method, units, field, patches, images, projections)
