"""Exact IoU counts of one layer: :class:`IoUTally` and the choice of its counting engine.

Two engines count the same integers. ``"torch"`` (vectorized torch ops: :mod:`.active_pixels`
for the active row intervals, :mod:`.label_runs` to count them against the label rows' runs)
runs on any device; ``"numba"`` (:mod:`.numba_engine`, one compiled pass per image) runs on the
CPU, 2-3x faster there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._plumbing.checks import one_of
from ..datasets.concepts import Concept
from ..errors import DissectError
from .active_pixels import active_intervals, flat_nonzero
from .label_runs import LabelBatch, LabelRuns, interval_label_counts, label_batch

ENGINES = ("auto", "numba", "torch")
AREAS = ("annotated", "lite")


def _resolve_engine(engine: str, device: torch.device) -> str:
    """``"numba"`` or ``"torch"`` for :class:`IoUTally`'s ``engine=`` on ``device``."""
    one_of(engine, "engine", ENGINES)
    if engine == "torch" or (engine == "auto" and device.type != "cpu"):
        return "torch"  # numba (and LLVM) are not even imported
    from . import numba_engine

    if engine == "auto":
        return "numba" if numba_engine.available() else "torch"
    if device.type != "cpu":
        raise DissectError(f"engine='numba' counts on the CPU only, not on {device}: "
                           "use engine='torch' (or 'auto')")
    if not numba_engine.available():
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
        ``"torch"``: vectorized torch ops (:mod:`.active_pixels`, :mod:`.label_runs`), on any
        device. ``"numba"``: one compiled pass per image (:mod:`.numba_engine`), CPU only,
        2-3x faster there. ``"auto"`` (default): ``"numba"`` on the CPU when numba imports,
        ``"torch"`` otherwise.
    area
        Which images a unit's active pixels count on for a category: ``A[k, cat]``, the
        active area in the union ``A[k, cat] + L[c] - I[k, c]`` of every concept ``c`` of the
        category. ``"annotated"`` (default): unit ``k``'s active pixels of every image where
        the category is annotated. ``"lite"``: NetDissect-Lite's rule
        (``tally_units_cat += len(indexes) * (tally_cat > 0)``): an image's active pixels of
        unit ``k`` count for a category only when one of them carries a pixel label of a scored
        concept of the category (one in ``concepts``; other label numbers never count), or the
        image has an image-level label of a scored concept of the category; the ``annotated``
        flags are then not used. Both engines count both rules exactly; the ``"torch"`` engine
        is slower with ``"lite"`` (it counts labels per image and unit).
    """

    def __init__(
        self,
        units: int,
        concepts: list[Concept],
        categories: list[str],
        device: torch.device | str = "cpu",
        *,
        engine: str = "auto",
        area: str = "annotated",
    ) -> None:
        one_of(area, "area", AREAS)
        self.units, self.concepts, self.categories = units, list(concepts), list(categories)
        self.device = torch.device(device)
        self.engine = _resolve_engine(engine, self.device)
        self.area_rule = area
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
        """The :class:`.label_runs.LabelBatch` that :meth:`add` needs for these
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
            ``(B, n_categories)`` bool (``area="annotated"``; not used with ``"lite"``).
        labels
            :func:`.label_runs.label_batch` of ``pixel_labels`` made by the caller, to
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
        lite = self.area_rule == "lite"
        hits = None  # (B, K, n_categories): categories hit by each unit's active pixels
        if self.engine == "numba":
            from .numba_engine import count_batch

            counted = count_batch(
                maps, thresholds, pixel_labels, self._lut, C, self._geometry,
                concept_category=self.concept_category.cpu() if lite else None,
                n_categories=len(self.categories))
            inter, area, per_image = counted[:3]
            self.area += area
            self.intersection += inter
            per_image = per_image.double()
            if lite:
                hits = counted[3].to(dev)
        else:
            per_image, hits = self._count_torch(maps, thresholds, pixel_labels, labels, lite)
        if lite:  # NetDissect-Lite: an image counts for the categories its labels show
            img_cat = torch.zeros(B, len(self.categories), dtype=torch.float64, device=dev)
            img_cat.index_add_(1, self.concept_category, img_hot)
            assert hits is not None
            take = (hits | (img_cat > 0)[:, None, :]).double()  # (B, K, n_categories)
            self.active += (per_image[:, :, None] * take).sum(0).round().long()
        else:  # active areas over the annotated categories
            ann = annotated.to(dev).double()
            self.active += (per_image.T @ ann).round().long()
        # image-level concepts cover the image
        self.intersection += (per_image.T @ img_hot).round().long()

    def _count_torch(self, maps: torch.Tensor, thresholds: torch.Tensor,
                     pixel_labels: torch.Tensor, labels: LabelBatch | None, lite: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``"torch"`` engine: adds pixel-level areas and intersections, returns the
        ``(B, K)`` float64 active pixels per image and unit and, when ``lite``, the
        ``(B, K, n_categories)`` bool categories their pixel labels hit (else ``None``)."""
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
        hits = (torch.zeros(B, K, len(self.categories), dtype=torch.bool, device=dev)
                if lite else None)
        if P and len(b):
            if hits is None:
                counts = interval_label_counts(runs, b, k, y, x0, x1, K, n_labels)
                self.intersection += counts.index_select(1, self._numbers)
            else:
                self._count_lite(runs, b, k, y, x0, x1, n_labels, hits)
        return per_image.view(B, K), hits

    def _count_lite(self, runs: LabelRuns, b: torch.Tensor, k: torch.Tensor, y: torch.Tensor,
                    x0: torch.Tensor, x1: torch.Tensor, n_labels: int, hits: torch.Tensor
                    ) -> None:
        """The pixel-level intersections of the intervals, counted per (image, unit) a few
        images at a time, adding them up and setting ``hits[b, k, cat]`` where unit ``k``'s
        intervals in image ``b`` cover a pixel label of a scored concept of category ``cat``."""
        B, K, n_cat = hits.shape
        C = len(self.concepts)
        step = max(1, (1 << 24) // max(1, K * n_labels))
        for s in range(0, B, step):
            sel = flat_nonzero((b >= s) & (b < s + step))
            if not sel.numel():
                continue
            unit = (b.index_select(0, sel) - s) * K + k.index_select(0, sel)
            n = min(step, B - s)
            counts = interval_label_counts(runs, b.index_select(0, sel), unit,
                                           y.index_select(0, sel), x0.index_select(0, sel),
                                           x1.index_select(0, sel), n * K, n_labels)
            scored = counts.index_select(1, self._numbers)  # (n * K, C)
            self.intersection += scored.view(n, K, C).sum(0)
            by_cat = torch.zeros(n * K, n_cat, dtype=torch.float64, device=hits.device)
            by_cat.index_add_(1, self.concept_category, (scored > 0).double())
            hits[s : s + n] |= (by_cat > 0).view(n, K, n_cat)

    def merge(self, other: IoUTally) -> None:
        """Add another tally of the same layer, concepts and area rule (e.g. from another
        process)."""
        if getattr(other, "area_rule", "annotated") != self.area_rule:
            raise DissectError(f"cannot merge a tally counted with area={other.area_rule!r} "
                               f"into one counted with area={self.area_rule!r}")
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
