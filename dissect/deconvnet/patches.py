"""Zeiler & Fergus's top patches: each unit's strongest images, projected and cropped."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._plumbing.checks import positive_int, unit_list, units_in_range
from .._plumbing.device import prepared
from .._plumbing.items import split_item, stack_inputs
from .._plumbing.progress import progress_bar
from ..errors import DataError, DissectError, StoreError
from ..store import ActivationStore
from ._common import check_method, one_layer
from ._rules import report_others
from .projection import argmax_positions, backproject, layer_output, spike_signal
from .receptive import ReceptiveField, receptive_field

log = logging.getLogger("dissect.deconvnet")

RTOL = 1e-3  # a cropped forward pass must give the unit's value to this relative tolerance


@dataclass(frozen=True)
class Patch:
    """One of a unit's top images.

    Attributes
    ----------
    unit, rank
        The unit and the image's rank among its top images (0: the strongest).
    row
        Position of the image in the dataset (``dataset[row]``).
    index
        The item's own ``"index"`` (its dataset index; ``row`` when items have none).
    value
        The unit's maximal activation on the image (the top signal's value).
    position
        ``(i, j)`` of that maximum in the layer's maps (``()`` for a layer without maps).
    box
        The position's receptive field clipped to the image, ``(y0, y1, x0, x1)``.
    window
        The input box shown as the patch: the layer's fixed patch shape, holding ``box``.
    """

    unit: int
    rank: int
    row: int
    index: int
    value: float
    position: tuple[int, ...]
    box: tuple[int, int, int, int]
    window: tuple[int, int, int, int]


class TopPatches:
    """Top-k images of some units of one layer, with projections (:func:`top_patches`).

    Attributes
    ----------
    layer, method, k
        What was computed (``k`` may be smaller than asked when the dataset is small).
    units
        The units, in the order of the first axis of the arrays.
    field
        The layer's :class:`ReceptiveField` for the dataset's input size.
    patches
        ``patches[n]`` lists unit ``units[n]``'s :class:`Patch` es, strongest first.
    images
        ``(U, k, C, h, w)`` the patches of the model inputs (normalized, as the model sees
        them; ``transform.denormalize`` turns them back into pictures).
    projections
        ``(U, k, C, h, w)`` the projections on the same windows (zero outside the field).
    """

    def __init__(self, layer: str, method: str, units: list[int], field: ReceptiveField,
                 patches: list[list[Patch]], images: torch.Tensor,
                 projections: torch.Tensor) -> None:
        self.layer, self.method, self.units, self.field = layer, method, units, field
        self.patches, self.images, self.projections = patches, images, projections
        self.k = images.shape[1]

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, unit: int) -> list[Patch]:
        """The patches of ``unit`` (a unit index of the layer, not a position)."""
        try:
            return self.patches[self.units.index(unit)]
        except ValueError:
            raise DissectError(f"unit {unit} was not computed; units: {self.units}") from None

    def rows(self) -> list[Patch]:
        """Every patch, unit by unit, strongest first."""
        return [p for unit_patches in self.patches for p in unit_patches]

    def summary(self) -> str:
        """A few lines: the layer, its receptive field and each unit's top values."""
        lines = [f"top-{self.k} {self.method} patches of {len(self.units)} units of "
                 f"{self.layer}; receptive field {self.field}"]
        for unit, unit_patches in zip(self.units, self.patches, strict=True):
            values = ", ".join(f"{p.value:.3g}" for p in unit_patches[:5])
            more = ", ..." if len(unit_patches) > 5 else ""
            rows = ", ".join(str(p.row) for p in unit_patches[:5])
            lines.append(f"  unit {unit:4d}: max {values}{more} (images {rows}{more})")
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per patch (unit, rank, row, index, value, position, box, window)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "unit", "rank", "row", "index", "value", "i", "j",
                             "box_y0", "box_y1", "box_x0", "box_x1",
                             "window_y0", "window_y1", "window_x0", "window_x1"])
            for p in self.rows():
                pos = list(p.position) + [""] * (2 - len(p.position))
                writer.writerow([self.layer, p.unit, p.rank, p.row, p.index, repr(p.value),
                                 *pos[:2], *p.box, *p.window])
        return path

    def to_json(self, path: str | Path) -> Path:
        """Write the metadata (no arrays) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "layer": self.layer, "method": self.method, "k": self.k, "units": self.units,
            "receptive_field": asdict(self.field),
            "patches": [asdict(p) for p in self.rows()],
        }
        path.write_text(json.dumps(doc, indent=1))
        return path

    def __repr__(self) -> str:
        return (f"TopPatches(layer={self.layer!r}, method={self.method!r}, "
                f"units={len(self.units)}, k={self.k}, patch={tuple(self.images.shape[-2:])})")


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


def _scan(model: nn.Module, module: nn.Module, name: str, dataset: Any, rows: Sequence[int],
          units: list[int], batch_size: int, num_workers: int, dev: torch.device,
          progress: bool, desc: str) -> _Scan:
    """Max value and arg-max position of each unit on each row (a forward pass, no graph)."""
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
            out = layer_output(model, module, name, x.to(dev))
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


def _project_pairs(model: nn.Module, module: nn.Module, name: str, dataset: Any,
                   pairs: list[_Pair], field: ReceptiveField, method: str, batch_size: int,
                   num_workers: int, dev: torch.device, images: torch.Tensor,
                   projections: torch.Tensor, others: Counter, progress: bool) -> list[_Pair]:
    """Project every pair on its crop, batching pairs of one crop shape; return misfits.

    Each image is read once; its pairs' crops wait in a queue per crop shape until a batch
    is full. A pair whose cropped forward pass does not reproduce the unit's value (a network
    that is not translation-covariant) is returned, to be redone on the full image.
    """
    by_row: dict[int, list[_Pair]] = {}
    for p in pairs:
        by_row.setdefault(p.row, []).append(p)
    queues: dict[tuple[int, ...], list[tuple[_Pair, torch.Tensor]]] = {}
    misfits: list[_Pair] = []
    stride = field.stride

    def run(queue: list[tuple[_Pair, torch.Tensor]]) -> None:
        batch = [p for p, _ in queue]
        x = torch.stack([c for _, c in queue]).to(dev)
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
            bad = (~torch.isclose(got, expected.to(got.dtype), rtol=RTOL,
                                  atol=RTOL * 1e-1 * scale)).cpu()
            return spike_signal(out, units, "max", flat)

        (grads,) = backproject(model, module, name, x, method, [make], others)
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


def _store_maxima(store: ActivationStore, name: str, units: list[int], dataset: Any,
                  model: nn.Module) -> torch.Tensor:
    """The store's per-image maxima of ``units`` (rows are dataset positions)."""
    if not isinstance(store, ActivationStore):
        raise DissectError(f"store must be an ActivationStore, not {type(store).__name__}")
    from ..hooks import fingerprint

    saved = store.meta.get("fingerprint")
    if saved is not None and saved != fingerprint(model):
        raise StoreError(
            f"{store.path} was captured from another model (or other weights) than this one: "
            "capture a store of this model, or pass store=None to scan the dataset")
    maxima = store.maxima(name)
    units_in_range(units, maxima.shape[1], name)
    if not store.complete:
        log.warning("%s is incomplete: using its %d written rows", store.path, len(maxima))
    if len(maxima) > len(dataset):
        raise DataError(f"{store.path} has {len(maxima)} rows but the dataset only "
                        f"{len(dataset)} items: pass the dataset the store was captured from")
    return torch.from_numpy(np.asarray(maxima)[:, units]).float()


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
) -> TopPatches:
    """Each unit's top-k images with their projections, cropped to its receptive field.

    Zeiler & Fergus's Fig. 2: for every unit, the ``k`` dataset images on which its maximal
    activation is largest; for each, the projection of that maximum (:func:`reconstruct`
    with ``location="max"``) and the image patch, both cut to the same window: the receptive
    field of the position of the maximum (:func:`receptive_field`, exact), of one shape for
    the whole layer, shifted inward at the image border.

    Parameters
    ----------
    model
        The network (eval mode inside, modes restored; moved to ``device``).
    dataset
        A map-style dataset of model inputs: items are a tensor, a tuple whose first element
        is one, or a dict with ``"image"`` (and optionally ``"index"``). All of one shape.
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
    method = check_method(method)
    units = unit_list(units)
    k = positive_int(k, "k")
    batch_size = positive_int(batch_size, "batch_size")
    name, module = one_layer(model, layer)
    try:
        n = len(dataset)
    except TypeError:
        raise DataError("dataset must be a sized, map-style dataset (len(dataset))") from None
    if n == 0:
        raise DataError("the dataset is empty")
    others: Counter[str] = Counter()
    with prepared(model, device) as dev:
        if store is None:
            scan = _scan(model, module, name, dataset, range(n), units, batch_size,
                         num_workers, dev, progress, f"maxima {name}")
            values = scan.values
        else:
            values = _store_maxima(store, name, units, dataset, model)
        k = min(k, len(values))
        order = torch.sort(values, dim=0, descending=True, stable=True).indices[:k]  # (k, U)
        chosen = sorted(set(order.flatten().tolist()))
        if store is not None:  # positions (and exact values) of the chosen images only
            scan = _scan(model, module, name, dataset, chosen, units, batch_size, num_workers,
                         dev, progress, f"positions {name}")
            at = {row: n for n, row in enumerate(chosen)}
        else:
            at = {row: row for row in chosen}
        if len(scan.spatial) not in (0, 2) or len(scan.input_shape) != 3:
            raise DissectError(
                f"top_patches needs (C, H, W) inputs and a layer with 2-D maps or none; got "
                f"inputs {scan.input_shape} and maps {scan.spatial}")
        field = receptive_field(model, name, scan.input_shape, device=dev)
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
        misfits = _project_pairs(model, module, name, dataset, pairs, field, method,
                                 batch_size, num_workers, dev, images, projections, others,
                                 progress)
        if misfits:
            log.warning(
                "%d of %d crops of %r did not reproduce the unit's value (a network that is "
                "not translation-covariant?); recomputing them on the whole image (crop=False "
                "skips the crops)", len(misfits), len(pairs), name)
            redo = [_Pair(p.slot, p.unit, p.row, p.value, p.position, full, p.window)
                    for p in misfits]
            left = _project_pairs(model, module, name, dataset, redo, field, method,
                                  batch_size, num_workers, dev, images, projections, others,
                                  progress)
            if left:
                raise DissectError(
                    f"the forward pass of {left[0].row} no longer gives unit {left[0].unit}'s "
                    f"value {left[0].value:.6g}: is the model or the dataset random?")
    report_others(others, method)
    return TopPatches(name, method, units, field, patches, images, projections)
