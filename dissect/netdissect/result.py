"""The results of Network Dissection: :class:`UnitResult` rows and :class:`DissectionResult`."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets.concepts import Concept
from ..errors import DissectError


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
