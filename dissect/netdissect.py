"""Network Dissection (Bau et al., CVPR 2017): exact unit-concept IoU scoring.

For every unit ``k`` of a layer and concept ``c`` of a :class:`~dissect.datasets.ConceptDataset`:

- ``T_k`` is the ``(1 - quantile)`` quantile of all raw activations of unit ``k`` over the dataset
  (every position of every image), equal to ``numpy.quantile(values, 1 - quantile)``: exact
  (:func:`dissect.stats.exact_quantiles`), not a sketch.
- Each map is upsampled to the segmentation size by bilinear interpolation
  (``align_corners=False``); active pixels are those ``> T_k``
  (:func:`dissect.active_pixels.active_pixels`, exact and sparse).
- ``I[k, c]`` sums ``|active_k AND mask_c|``, ``A[k, cat]`` sums the active area over images on
  which category ``cat`` is annotated, ``L[c]`` the area of concept ``c``; an image-level label
  covers its whole image. ``IoU[k, c] = I / (A[k, cat(c)] + L[c] - I)`` with ``cat(c)`` the
  concept's primary category. A unit is a detector when its best IoU exceeds ``iou_threshold``.

Counts are exact integers (int64 tallies; float64 sums and matrix products of integers below
2**53). The intersections are counted per active row interval, not per pixel: each label row is
cut into runs of one concept and an interval adds its overlap with each run it touches.

Across processes (``torchrun``, :mod:`dissect.distributed`) each rank reads a contiguous shard
of the store's rows; the thresholds are merged exactly (:func:`dissect.stats.exact_quantiles`
with a collective) and the counts summed with an int64 all-reduce, so every rank returns the
same result as a single process, bit for bit.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._device import resolve_device
from .active_pixels import active_intervals
from .datasets.concepts import Concept, collate
from .distributed import DistContext
from .distributed import resolve as resolve_distributed
from .errors import DissectError
from .hooks.capture import capture
from .hooks.layers import LayerSelector
from .label_runs import LabelBatch, interval_label_counts, label_batch
from .stats import exact_quantiles
from .store import ActivationStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitResult:
    """The best concept of one unit (overall, or within one category)."""

    layer: str
    unit: int
    concept: str
    category: str
    iou: float
    threshold: float
    is_detector: bool


ENGINES = ("auto", "numba", "torch")


def _resolve_engine(engine: str, device: torch.device) -> str:
    """``"numba"`` or ``"torch"`` for :class:`IoUTally`'s ``engine=`` on ``device``."""
    if engine not in ENGINES:
        raise DissectError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "torch" or (engine == "auto" and device.type != "cpu"):
        return "torch"  # numba (and LLVM) are not even imported
    from . import fused_tally

    if engine == "auto":
        return "numba" if fused_tally.available() else "torch"
    if device.type != "cpu":
        raise DissectError(f"engine='numba' counts on the CPU only, not on {device}: "
                           "use engine='torch' (or 'auto')")
    if not fused_tally.available():
        raise DissectError("engine='numba' needs numba (pip install numba); "
                           "engine='torch' works without it")
    return engine


class IoUTally:
    """Exact running counts ``I (K, C)``, ``A (K, n_categories)``, ``L (C,)`` for one layer.

    Has the running-statistics shape: :meth:`add`, :meth:`merge`, :meth:`result`,
    :meth:`state_dict` / :meth:`load_state_dict`, so a tally can be resumed or summed across
    processes.

    Parameters
    ----------
    units
        Number of units ``K``.
    concepts
        The concept table (columns of ``I``).
    categories
        The dataset's categories (the order of ``annotated`` flags).
    device
        Where the counting runs.
    engine
        How a batch is counted; both engines give the same counts.
        ``"torch"``: vectorized torch ops (:mod:`dissect.active_pixels`,
        :mod:`dissect.label_runs`), on any device. ``"numba"``: one compiled pass per image
        (:mod:`dissect.fused_tally`), CPU only, 2-3x faster there. ``"auto"`` (default):
        ``"numba"`` on the CPU when numba imports, ``"torch"`` otherwise.
    """

    def __init__(
        self,
        units: int,
        concepts: list[Concept],
        categories: list[str],
        device: torch.device | str = "cpu",
        *,
        engine: str = "auto",
    ) -> None:
        self.units, self.concepts, self.categories = units, list(concepts), list(categories)
        self.device = torch.device(device)
        self.engine = _resolve_engine(engine, self.device)
        C = len(self.concepts)
        self.intersection = torch.zeros(units, C, dtype=torch.int64, device=self.device)
        self.active = torch.zeros(units, len(categories), dtype=torch.int64, device=self.device)
        self.area = torch.zeros(C, dtype=torch.int64, device=self.device)
        numbers = [c.number for c in self.concepts]
        lut = torch.zeros(max(numbers, default=0) + 1, dtype=torch.int64)
        lut[torch.tensor(numbers, dtype=torch.int64)] = torch.arange(1, C + 1)
        self._lut = lut.to(self.device)  # label number -> column + 1 (0: not scored)
        self._numbers = torch.tensor(numbers, dtype=torch.int64, device=self.device)
        self._geometry: dict = {}  # active_pixels' per-layer cache
        cat_index = {c: i for i, c in enumerate(self.categories)}
        missing = {c.category for c in self.concepts} - set(cat_index)
        if missing:
            raise DissectError(f"concepts name categories {sorted(missing)} the dataset lacks")
        self.concept_category = torch.tensor(
            [cat_index[c.category] for c in self.concepts], dtype=torch.int64, device=self.device
        )

    def label_batch(self, pixel_labels: torch.Tensor) -> LabelBatch:
        """The :class:`~dissect.label_runs.LabelBatch` that :meth:`add` needs for these
        labels with the ``"torch"`` engine (make it once per batch when several tallies count
        the same images; the ``"numba"`` engine reads the labels themselves)."""
        return label_batch(pixel_labels, self.device, len(self._lut))

    def _codes(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.device, torch.int64)
        if labels.numel() and int(labels.max()) >= len(self._lut):
            self._lut = torch.cat(
                [self._lut, self._lut.new_zeros(int(labels.max()) + 1 - len(self._lut))]
            )
        return self._lut.index_select(0, labels.clamp(min=0).reshape(-1)).view(labels.shape)

    def add(
        self,
        maps: torch.Tensor,
        thresholds: torch.Tensor,
        pixel_labels: torch.Tensor,
        image_labels: torch.Tensor,
        annotated: torch.Tensor,
        *,
        labels: LabelBatch | None = None,
    ) -> None:
        """Count one batch.

        Parameters
        ----------
        maps
            ``(B, K, h, w)`` activations.
        thresholds
            ``(K,)`` thresholds.
        pixel_labels
            ``(B, P, sh, sw)`` label numbers (0 = none).
        image_labels
            ``(B, L)`` image-level label numbers (0 = none).
        annotated
            ``(B, n_categories)`` bool.
        labels
            :func:`~dissect.label_runs.label_batch` of ``pixel_labels`` made by the caller, to
            share it between the tallies of several layers (made here when ``None``). Only the
            ``"torch"`` engine uses it; the ``"numba"`` engine reads ``pixel_labels``.
        """
        B, K = maps.shape[:2]
        P, sh, sw = pixel_labels.shape[1:]
        C = len(self.concepts)
        dev = self.device
        img_codes = self._codes(image_labels)  # (B, L)
        img_hot = torch.zeros(B, C + 1, dtype=torch.float64, device=dev)
        img_hot.scatter_(1, img_codes, 1.0)
        img_hot = img_hot[:, 1:]  # (B, C): each image-level concept at most once per image
        self.area += (img_hot.sum(dim=0) * (sh * sw)).round().long()
        if self.engine == "numba":
            from .fused_tally import count_batch

            inter, area, per_image = count_batch(
                maps, thresholds, pixel_labels, self._lut, C, self._geometry)
            self.area += area
            self.intersection += inter
            per_image = per_image.double()
        else:
            per_image = self._count_torch(maps, thresholds, pixel_labels, labels)
        # active areas over the annotated categories; image-level concepts cover the image
        ann = annotated.to(dev).double()
        self.active += (per_image.T @ ann).round().long()
        self.intersection += (per_image.T @ img_hot).round().long()

    def _count_torch(self, maps: torch.Tensor, thresholds: torch.Tensor,
                     pixel_labels: torch.Tensor, labels: LabelBatch | None) -> torch.Tensor:
        """The ``"torch"`` engine: adds pixel-level areas and intersections, returns the
        ``(B, K)`` float64 active pixels per image and unit."""
        B, K = maps.shape[:2]
        P, sh, sw = pixel_labels.shape[1:]
        dev = self.device
        if labels is None:
            labels = self.label_batch(pixel_labels)
        elif labels.n_labels < len(self._lut):
            raise DissectError("labels= was made with fewer label numbers than this tally "
                               "scores: use IoUTally.label_batch")
        runs, hist, n_labels = labels.runs, labels.hist, labels.n_labels
        self.area += hist.sum(0).index_select(0, self._numbers)
        # active pixels, as row intervals [x0, x1)
        b, k, y, x0, x1 = active_intervals(maps.to(dev), thresholds.to(dev), (sh, sw),
                                           self._geometry)
        length = (x1 - x0).double()
        # .double(): on empty input a weighted bincount returns int64
        per_image = torch.bincount(b * K + k, weights=length, minlength=B * K).double()
        if P and len(b):
            counts = interval_label_counts(runs, b, k, y, x0, x1, K, n_labels)
            self.intersection += counts.index_select(1, self._numbers)
        return per_image.view(B, K)

    def merge(self, other: IoUTally) -> None:
        """Add another tally of the same layer and concepts (e.g. from another process)."""
        self.intersection += other.intersection.to(self.device)
        self.active += other.active.to(self.device)
        self.area += other.area.to(self.device)

    def result(self) -> np.ndarray:
        """``(K, C)`` IoU as float64 numpy (0 where the union is empty)."""
        inter = self.intersection.double()
        union = self.active[:, self.concept_category].double() + self.area.double()[None] - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
        return iou.cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        """The counts (exact int64), for checkpoints and merging."""
        return {
            "intersection": self.intersection.cpu(),
            "active": self.active.cpu(),
            "area": self.area.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`."""
        self.intersection = state["intersection"].to(self.device)
        self.active = state["active"].to(self.device)
        self.area = state["area"].to(self.device)


class DissectionResult:
    """Results of :func:`dissect` for several layers.

    Attributes
    ----------
    layers
        Dissected layers in order.
    concepts
        The scored concepts: the column order of :meth:`iou`.
    categories
        Categories of the scored concepts, in the dataset's order.
    quantile, iou_threshold
        The settings used.
    """

    def __init__(
        self,
        layers: list[str],
        concepts: list[Concept],
        categories: list[str],
        iou: dict[str, np.ndarray],
        thresholds: dict[str, np.ndarray],
        top_images: dict[str, np.ndarray],
        *,
        quantile: float,
        iou_threshold: float,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.concepts = list(concepts)
        self.categories = list(categories)
        self._iou = iou
        self._thresholds = thresholds
        self._top = top_images
        self.quantile, self.iou_threshold = quantile, iou_threshold
        self.meta = dict(meta or {})

    def _check(self, layer: str) -> None:
        if layer not in self._iou:
            raise DissectError(f"layer {layer!r} was not dissected; layers: {self.layers}")

    def iou(self, layer: str) -> np.ndarray:
        """``(K, C)`` IoU of every unit with every concept (columns: :attr:`concepts`)."""
        self._check(layer)
        return self._iou[layer]

    def thresholds(self, layer: str) -> np.ndarray:
        """``(K,)`` activation thresholds ``T_k``."""
        self._check(layer)
        return self._thresholds[layer]

    def top_images(self, layer: str, k: int | None = None) -> np.ndarray:
        """``(K, k)`` dataset indices of each unit's most activating images (by spatial max)."""
        self._check(layer)
        top = self._top[layer]
        return top if k is None else top[:, :k]

    def units(self, layer: str, category: str | None = None) -> list[UnitResult]:
        """The best concept of every unit, in unit order.

        Parameters
        ----------
        layer
            A dissected layer.
        category
            Only consider concepts of this category (best concept per category).
        """
        iou = self.iou(layer)
        thr = self.thresholds(layer)
        cols = np.arange(len(self.concepts))
        if category is not None:
            if category not in self.categories:
                raise DissectError(f"unknown category {category!r}; have {self.categories}")
            cols = np.array([i for i, c in enumerate(self.concepts) if c.category == category])
        out = []
        for unit in range(iou.shape[0]):
            if cols.size == 0:
                break
            j = int(cols[np.argmax(iou[unit, cols])])
            c = self.concepts[j]
            value = float(iou[unit, j])
            out.append(UnitResult(layer, unit, c.name, c.category, value, float(thr[unit]),
                                  value > self.iou_threshold))
        return out

    def detectors(self, layer: str) -> list[UnitResult]:
        """Units whose best IoU exceeds the threshold, best first."""
        return sorted((u for u in self.units(layer) if u.is_detector), key=lambda u: -u.iou)

    def summary(self) -> str:
        """Per layer: detectors, unique concepts, detectors per category."""
        lines = [f"Network Dissection (quantile={self.quantile}, IoU > {self.iou_threshold})"]
        header = f"{'layer':<20} {'units':>6} {'detectors':>9} {'unique':>6}  per category"
        lines.append(header)
        for layer in self.layers:
            det = self.detectors(layer)
            per_cat = Counter(u.category for u in det)
            cats = ", ".join(f"{c} {per_cat[c]}" for c in self.categories if per_cat[c])
            unique = len({u.concept for u in det})
            n = self.iou(layer).shape[0]
            lines.append(f"{layer:<20} {n:>6} {len(det):>9} {unique:>6}  {cats or '-'}")
        return "\n".join(lines)

    def to_csv(self, directory: str | Path) -> list[Path]:
        """One CSV per layer with NetDissect's columns.

        ``unit, category, label, score`` (the best concept overall), then per category
        ``<cat>-label, <cat>-iou``; units are numbered from 0.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for layer in self.layers:
            per_cat = {c: self.units(layer, c) for c in self.categories}
            path = directory / f"{layer}.csv"
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["unit", "category", "label", "score"]
                           + [f"{c}-{s}" for c in self.categories for s in ("label", "iou")])
                for u in self.units(layer):
                    row: list[Any] = [u.unit, u.category, u.concept, f"{u.iou:.6f}"]
                    for c in self.categories:
                        best = per_cat[c][u.unit]
                        row += [best.concept, f"{best.iou:.6f}"]
                    w.writerow(row)
            paths.append(path)
        return paths

    def to_json(self, path: str | Path) -> Path:
        """Everything (IoU matrices, thresholds, top images, settings) as one JSON file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": "torch-dissect-netdissect",
            "version": 1,
            "quantile": self.quantile,
            "iou_threshold": self.iou_threshold,
            "meta": self.meta,
            "categories": self.categories,
            "concepts": [c._asdict() for c in self.concepts],
            "layers": {
                layer: {
                    "thresholds": self._thresholds[layer].tolist(),
                    "iou": self._iou[layer].tolist(),
                    "top_images": self._top[layer].tolist(),
                    "units": [asdict(u) for u in self.units(layer)],
                }
                for layer in self.layers
            },
        }
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> DissectionResult:
        """Load a result written by :meth:`to_json`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise DissectError(f"cannot read a dissection result from {path}: {exc}") from exc
        if data.get("format") != "torch-dissect-netdissect":
            raise DissectError(f"{path} is not a torch-dissect dissection result")
        layers = list(data["layers"])
        get = data["layers"]
        return cls(
            layers,
            [Concept(**c) for c in data["concepts"]],
            data["categories"],
            {k: np.asarray(get[k]["iou"], dtype=np.float64) for k in layers},
            {k: np.asarray(get[k]["thresholds"], dtype=np.float32) for k in layers},
            {k: np.asarray(get[k]["top_images"], dtype=np.int64) for k in layers},
            quantile=data["quantile"],
            iou_threshold=data["iou_threshold"],
            meta=data.get("meta", {}),
        )


class _Annotations(Dataset):
    """A concept dataset's annotations in store row order (skipping images when possible)."""

    def __init__(self, dataset: Any, index: np.ndarray) -> None:
        self.dataset, self.index = dataset, index
        self._light = callable(getattr(dataset, "annotations", None))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> dict[str, Any]:
        i = int(self.index[row])
        item = self.dataset.annotations(i) if self._light else self.dataset[i]
        return {k: item[k] for k in ("pixel_labels", "image_labels", "annotated", "index")}


def _check_dataset(dataset: Any) -> None:
    for attr in ("concepts", "categories"):
        if not hasattr(dataset, attr):
            raise DissectError(
                f"dataset has no .{attr}: dissection needs a ConceptDataset "
                "(Broden, SyntheticConcepts, or one with the same contract)"
            )


def dissect(
    source: ActivationStore | nn.Module,
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
    top_k: int = 16,
    distributed: DistContext | bool | None = None,
) -> DissectionResult:
    """Score every unit of the chosen layers against every concept of a concept dataset.

    Parameters
    ----------
    source
        An :class:`~dissect.ActivationStore` captured over ``dataset`` with ``pool=None``
        (rows aligned by its ``/index``), or a model: then its activations are captured first
        into ``store_path`` (a temporary file when ``None``) with the dataset's transform.
    dataset
        A concept dataset (``concepts``, ``categories``, items with label planes).
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
        ``None`` for CUDA when available, else CPU. Counting runs there with
        :class:`IoUTally`'s default engine: numba's compiled kernel on the CPU, vectorized
        torch ops elsewhere (the same counts).
    progress
        Show progress bars.
    num_workers
        DataLoader workers reading the annotations.
    store_path
        Where to capture when ``source`` is a model.
    top_k
        How many top images per unit to keep (from the store's maxima).
    distributed
        Multi-process runs (:mod:`dissect.distributed`): ``None`` detects an initialized
        process group or ``torchrun``'s variables, ``False`` forces one process, or pass a
        :class:`~dissect.distributed.DistContext`. Each rank scores a contiguous shard of the
        rows; thresholds and counts are merged exactly and every rank returns the same result,
        identical to a single process's. A model is captured across the ranks first
        (``store_path`` must then be on a filesystem every rank sees; the default temporary
        folder is rank 0's, which only works on one machine). Only rank 0 shows progress bars.

    Returns
    -------
    DissectionResult
    """
    _check_dataset(dataset)
    if not 0 < quantile < 1:
        raise DissectError(f"quantile must be in (0, 1), got {quantile}")
    if batch_size < 1:
        raise DissectError(f"batch_size must be >= 1, got {batch_size}")
    ctx = resolve_distributed(distributed, device)
    dev = ctx.device(device) if ctx is not None else resolve_device(device)
    tmp = None
    shared_tmp: str | None = None
    if isinstance(source, nn.Module):
        if layers is None:
            raise DissectError("give layers=... when dissecting a model")
        if store_path is None and ctx is None:
            tmp = tempfile.TemporaryDirectory(prefix="dissect-")
            store_path = Path(tmp.name) / "activations.h5"
        elif store_path is None:
            shared_tmp = ctx.on_main("make a temporary folder",
                                     lambda: tempfile.mkdtemp(prefix="dissect-"))
            store_path = Path(shared_tmp) / "activations.h5"
        source = capture(source, dataset, layers, store_path, batch_size=batch_size,
                         device=dev, progress=progress, num_workers=num_workers,
                         distributed=ctx if ctx is not None else False)
    if not isinstance(source, ActivationStore):
        raise DissectError("source must be an ActivationStore or a torch.nn.Module")
    store = source
    finished = False
    try:
        result = _dissect_store(store, dataset, layers, quantile, iou_threshold, categories,
                                batch_size, dev, progress, num_workers, top_k, ctx)
        finished = True
        return result
    finally:
        if tmp is not None:
            store.close()
            tmp.cleanup()
        if shared_tmp is not None:
            store.close()
            if finished:  # every rank is done reading before rank 0 removes the folder
                ctx.barrier("remove the temporary store")
            if ctx.is_main:
                shutil.rmtree(shared_tmp, ignore_errors=True)


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
    top_k: int,
    ctx: DistContext | None = None,
) -> DissectionResult:
    if not store.complete:
        raise DissectError(f"{store.path} is an unfinished capture: rerun capture to finish it")
    if layers is None:
        names = store.layers
    elif isinstance(layers, str):
        names = [layers]
    elif callable(layers):
        names = [n for n in store.layers if layers(n)]
    else:
        names = list(layers)
    for name in names:
        if name not in store:
            raise DissectError(f"layer {name!r} is not in {store.path}; it has {store.layers}")
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
    # thresholds of every layer first (each its own pass over the store) ...
    thresholds: dict[str, np.ndarray] = {}
    tallies: dict[str, IoUTally] = {}
    for name in names:
        ds = store[name]
        n, units, h, w = ds.shape
        read = min(len(store), max(1, (1 << 24) // max(1, units * h * w)))

        def batches(ds=ds, read: int = read):
            for start in range(rows.start, rows.stop, read):
                block = torch.from_numpy(ds[start : min(start + read, rows.stop)]).float()
                yield block.transpose(0, 1).reshape(block.shape[1], -1)

        with ctx.phase("threshold merge") if ctx is not None else nullcontext():
            thresholds[name] = exact_quantiles(batches, units, n * h * w, 1 - quantile,
                                               dtype=np.dtype(ds.dtype), device=dev,
                                               collective=ctx)
        tallies[name] = IoUTally(units, concepts, all_cats, device=dev)
    # ... then one pass over the annotations for all layers: each batch's label planes are
    # decoded and cut into runs once, and every layer's tally counts against them
    thr_t = {name: torch.from_numpy(thresholds[name].astype(np.float32)).to(dev)
             for name in names}
    loader = DataLoader(_Annotations(dataset, index[rows.start : rows.stop]),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    desc = "netdissect " + (", ".join(names) if len(names) <= 3 else f"{len(names)} layers")
    row = rows.start
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
        for item in loader:
            b = len(item["annotated"])
            first = tallies[names[0]]  # the torch engine cuts label runs once for all layers
            labels = first.label_batch(item["pixel_labels"]) if first.engine == "torch" else None
            for name in names:
                maps = torch.from_numpy(store[name][row : row + b]).to(dev, torch.float32)
                tallies[name].add(maps, thr_t[name], item["pixel_labels"], item["image_labels"],
                                  item["annotated"], labels=labels)
            row += b
            bar.update(b)
    iou, top = {}, {}
    for name in names:
        tally = tallies[name]
        if ctx is not None:  # exact: int64 counts summed over the ranks
            with ctx.phase("count reduction"):
                tally.load_state_dict(
                    {k: ctx.all_sum(v) for k, v in tally.state_dict().items()}
                )
        iou[name] = tally.result()
        maxima = store.maxima(name)
        order = np.argsort(-maxima, axis=0, kind="stable")[: min(top_k, len(maxima))].T
        top[name] = index[order]
    meta = {"store": str(store.path), "model": store.meta.get("model"),
            "stored_dtype": str(stored_dtype), "n_images": int(len(index))}
    return DissectionResult(names, concepts, cats, iou, thresholds, top, quantile=quantile,
                            iou_threshold=iou_threshold, meta=meta)
