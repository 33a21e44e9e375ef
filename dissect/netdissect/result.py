"""The results of Network Dissection: :class:`UnitResult` rows and :class:`DissectionResult`."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._plumbing.deprecation import renamed_kwargs
from .._plumbing.paths import safe_name
from .._plumbing.result_files import read_json, result_path, write_json
from ..datasets.concepts import Concept
from ..errors import DissectError

FORMAT = "torch-dissect-netdissect"
VERSION = 1


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

        Notes
        -----
        NaN cells of :meth:`iou` are unknown IoUs (a result read from published CSVs by
        :meth:`from_netdissect_csv` knows only each unit's best concept per category) and are
        passed over. A unit whose cells are all NaN (nothing known about it) gets an empty
        concept name, IoU NaN and is never a detector; its category is ``category``, or the
        first category when none is given. Ties go to the first concept in :attr:`concepts`.
        """
        iou = self.iou(layer)
        thr = self.thresholds(layer)
        cols = np.arange(len(self.concepts))
        if category is not None:
            if category not in self.categories:
                raise DissectError(f"unknown category {category!r}; have {self.categories}")
            cols = np.array([i for i, c in enumerate(self.concepts) if c.category == category])
        if cols.size == 0:
            return []
        sub = iou[:, cols]
        known = ~np.isnan(sub)
        best = np.argmax(np.where(known, sub, -np.inf), axis=1)  # np.nanargmax, all-NaN safe
        unknown = (category if category is not None
                   else self.categories[0] if self.categories else "")
        out = []
        for unit in range(iou.shape[0]):
            if not known[unit].any():
                out.append(UnitResult(layer, unit, "", unknown, float("nan"), float(thr[unit]),
                                      False))
                continue
            j = int(cols[best[unit]])
            c = self.concepts[j]
            value = float(iou[unit, j])
            out.append(UnitResult(layer, unit, c.name, c.category, value, float(thr[unit]),
                                  value > self.iou_threshold))
        return out

    def detectors(self, layer: str) -> list[UnitResult]:
        """Units whose best IoU exceeds the threshold, best first."""
        return sorted((u for u in self.units(layer) if u.is_detector), key=lambda u: -u.iou)

    def summary(self) -> str:
        """Per layer: detectors, unique concepts, detectors per category; then the layers
        holding non-finite activations (``meta["nonfinite"]``), if any."""
        how = ("read from NetDissect CSVs" if self.meta.get("source") == "netdissect-csv"
               else f"quantile={self.quantile}")
        lines = [f"Network Dissection ({how}, IoU > {self.iou_threshold})"]
        header = f"{'layer':<20} {'units':>6} {'detectors':>9} {'unique':>6}  per category"
        lines.append(header)
        for layer in self.layers:
            det = self.detectors(layer)
            per_cat = Counter(u.category for u in det)
            cats = ", ".join(f"{c} {per_cat[c]}" for c in self.categories if per_cat[c])
            unique = len({u.concept for u in det})
            n = self.iou(layer).shape[0]
            lines.append(f"{layer:<20} {n:>6} {len(det):>9} {unique:>6}  {cats or '-'}")
        bad = {k: v for k, v in (self.meta.get("nonfinite") or {}).items() if v}
        if bad:
            lines.append("non-finite activation values (left out of the thresholds, never "
                         "active): " + ", ".join(f"{k} {v}" for k, v in bad.items()))
        return "\n".join(lines)

    def _csv_rows(self, layer: str) -> list[list[Any]]:
        per_cat = {c: self.units(layer, c) for c in self.categories}
        rows = []
        for u in self.units(layer):
            row: list[Any] = [u.unit, u.category, u.concept, f"{u.iou:.6f}"]
            for c in self.categories:  # a category without scored concepts (or without a
                best = per_cat[c][u.unit] if per_cat[c] else None  # known IoU): empty cells
                known = best is not None and np.isfinite(best.iou)
                row += [best.concept, f"{best.iou:.6f}"] if known else ["", ""]
            rows.append(row)
        return rows

    @renamed_kwargs(directory="path")
    def to_csv(self, path: str | Path) -> list[Path]:
        """Write the best concepts per unit as CSV, with NetDissect's columns.

        ``unit, category, label, score`` (the best concept overall), then per category
        ``<cat>-label, <cat>-iou``; units are numbered from 0.

        Parameters
        ----------
        path
            A folder: one ``<layer>.csv`` per layer in it, as NetDissect writes them. Or a
            file ending in ``.csv``: every layer in it, with a leading ``layer`` column.
            (``directory=`` is a deprecated alias, for one release.)

        Returns
        -------
        list of pathlib.Path
            The files written.
        """
        path = Path(path)
        header = ["unit", "category", "label", "score"] + [
            f"{c}-{s}" for c in self.categories for s in ("label", "iou")]
        if path.suffix.lower() == ".csv":
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["layer", *header])
                for layer in self.layers:
                    w.writerows([layer, *row] for row in self._csv_rows(layer))
            return [path]
        path.mkdir(parents=True, exist_ok=True)
        paths = []
        for layer in self.layers:
            file = path / f"{safe_name(layer)}.csv"
            with file.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(self._csv_rows(layer))
            paths.append(file)
        return paths

    def to_json(self, path: str | Path) -> Path:
        """Everything (IoU matrices, thresholds, top images, settings) as one JSON file.

        ``path`` is the file, or an existing folder to write ``netdissect.json`` in.
        """
        data = {
            "format": FORMAT,
            "version": VERSION,
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
        return write_json(result_path(path, "netdissect.json"), data, allow_nan=True)

    @classmethod
    def from_netdissect_csv(
        cls,
        paths: str | Path | Sequence[str | Path] | Mapping[str, str | Path],
        *,
        iou_threshold: float = 0.04,
        first_unit: int | str = "auto",
    ) -> DissectionResult:
        """Read NetDissect's, NetDissect-Lite's or :meth:`to_csv`'s per-unit result CSVs.

        Only each unit's best concept per category is in such files: the other cells of
        :meth:`iou` are NaN (unknown), thresholds are NaN and there are no top images. See
        :func:`dissect.netdissect.published.read_netdissect_csv` for the formats, the layer
        names and the unit numbering (``first_unit``).
        """
        from .published import read_netdissect_csv

        return read_netdissect_csv(paths, iou_threshold=iou_threshold, first_unit=first_unit)

    @classmethod
    def from_json(cls, path: str | Path) -> DissectionResult:
        """Load a result written by :meth:`to_json`."""
        data = read_json(result_path(path, "netdissect.json"), FORMAT, VERSION,
                         "dissection result")
        try:
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
        except (KeyError, TypeError, ValueError) as exc:
            raise DissectError(f"{path} is a damaged dissection result: {exc!r}") from exc
