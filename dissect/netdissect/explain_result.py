"""The results of :func:`~dissect.netdissect.explain.explain`: :class:`Explanation` rows and
:class:`ExplanationResult`, a list of them that knows its settings and files."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .._plumbing.result_files import read_json, result_path, write_json
from ..errors import DissectError

FORMAT = "torch-dissect-explanations"
VERSION = 1
DEFAULT_NAME = "explanations.json"
_TUPLES = ("concepts", "operators", "categories", "numbers")


@dataclass(frozen=True)
class Explanation:
    """The best formula of concepts found for one unit.

    Attributes
    ----------
    unit
        The unit (channel of the layer).
    formula
        The formula as text: a bare concept name for one concept (``"red"``), else binary
        operations in parentheses, nested to the left in the order they were built
        (``"(red AND circle)"``, ``"((red AND circle) OR blue)"``). A name shared by concepts
        of several scored categories is written ``category:name`` (``"color:orange"``); a name
        repeated within one category also gets its label number (``"color:orange#7"``).
    iou
        The formula's IoU with the unit's active pixels (exact counts; see
        :func:`~dissect.netdissect.explain.explain` for the images it is counted on).
    layer
        The layer.
    concepts
        The formula's concepts in order, as written in ``formula``.
    operators
        The operators between them (``len(concepts) - 1`` of ``"AND"``, ``"OR"``,
        ``"AND NOT"``): ``formula`` is ``((c0 op0 c1) op1 c2) ...``.
    categories
        The category of each concept.
    numbers
        The dataset label number of each concept (unambiguous).
    intersection, union
        The exact pixel counts behind ``iou``: ``iou = intersection / union`` (0 when the
        union is empty).
    best_concept, best_category, best_iou
        The best single concept, its category and IoU: what
        :func:`~dissect.netdissect.dissect` labels the unit with (for comparison).
    threshold
        The unit's activation threshold ``T_k`` (``inf``: never active).
    """

    unit: int
    formula: str
    iou: float
    layer: str = ""
    concepts: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    numbers: tuple[int, ...] = ()
    intersection: int = 0
    union: int = 0
    best_concept: str = ""
    best_category: str = ""
    best_iou: float = 0.0
    threshold: float = math.nan

    @property
    def length(self) -> int:
        """The number of concepts in the formula."""
        return len(self.concepts)

    @property
    def category_set(self) -> frozenset[str]:
        """The categories the formula draws on."""
        return frozenset(self.categories)

    @property
    def gain(self) -> float:
        """How much the formula improves on the best single concept (``iou - best_iou``)."""
        return self.iou - self.best_iou


def _row(data: dict[str, Any]) -> Explanation:
    names = {f.name for f in fields(Explanation)}
    unknown = set(data) - names
    if unknown:
        raise DissectError(f"unknown explanation fields {sorted(unknown)}")
    data = {k: tuple(v) if k in _TUPLES else v for k, v in data.items()}
    return Explanation(**data)


class ExplanationResult(list):
    """What :func:`~dissect.netdissect.explain.explain` returns: a ``list`` of
    :class:`Explanation` (one per unit, in the order asked) with the run's settings, and the
    result protocol's :meth:`to_json`, :meth:`from_json`, :meth:`to_csv` and :meth:`summary`.

    Parameters
    ----------
    explanations
        The rows.
    layer
        The layer explained.
    meta
        The settings and provenance (``length``, ``beam``, ``operators``, ``quantile``,
        ``categories``, ``n_images``, ``store``, ``model``, ...).
    """

    def __init__(self, explanations: Iterable[Explanation] = (), layer: str = "",
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__(explanations)
        for row in self:
            if not isinstance(row, Explanation):
                raise DissectError(f"an ExplanationResult holds Explanation rows, not "
                                   f"{type(row).__name__}")
        self.layer = layer
        self.meta = dict(meta or {})

    def unit(self, unit: int) -> Explanation:
        """The explanation of ``unit``."""
        for row in self:
            if row.unit == unit:
                return row
        raise DissectError(f"unit {unit} was not explained; units: {[r.unit for r in self]}")

    def summary(self) -> str:
        """The settings, then one line per unit: formula, IoU, best single concept."""
        m = self.meta
        lines = [f"Compositional explanations of {self.layer or '?'} ({len(self)} units; "
                 f"length {m.get('length', '?')}, beam {m.get('beam', '?')}, "
                 f"quantile {m.get('quantile', '?')})"]
        if self:
            better = sum(1 for r in self if r.iou > r.best_iou)
            lines.append(f"{better} of {len(self)} units are better explained by a formula "
                         "than by their best single concept")
        for r in self:
            lines.append(f"unit {r.unit:>4}  IoU {r.iou:.4f}  {r.formula}   "
                         f"(best single: {r.best_concept} {r.best_iou:.4f})")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> Path:
        """Write the result as one JSON file (atomically); ``path`` is the file or an existing
        folder (then ``explanations.json`` in it)."""
        doc = {"format": FORMAT, "version": VERSION, "layer": self.layer, "meta": self.meta,
               "explanations": [asdict(r) for r in self]}
        return write_json(result_path(path, DEFAULT_NAME), doc, allow_nan=True)

    @classmethod
    def from_json(cls, path: str | Path) -> ExplanationResult:
        """Load a result written by :meth:`to_json`."""
        path = result_path(path, DEFAULT_NAME)
        data = read_json(path, FORMAT, VERSION, "compositional explanation result")
        try:
            rows = [_row(dict(r)) for r in data["explanations"]]
            if not isinstance(data["layer"], str) or not isinstance(data.get("meta", {}), dict):
                raise ValueError("'layer' must be a string and 'meta' an object")
            return cls(rows, data["layer"], dict(data.get("meta") or {}))
        except (KeyError, TypeError, ValueError, DissectError) as exc:
            raise DissectError(f"{path} is a damaged explanation result: {exc}") from exc

    def to_csv(self, path: str | Path) -> Path:
        """One row per unit: ``layer, unit, formula, iou, length, concepts, operators,
        categories, intersection, union, best_concept, best_category, best_iou, threshold``
        (lists joined with ``" | "``). ``path`` is the file or an existing folder (then
        ``explanations.csv`` in it)."""
        path = result_path(path, "explanations.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "unit", "formula", "iou", "length", "concepts", "operators",
                        "categories", "intersection", "union", "best_concept", "best_category",
                        "best_iou", "threshold"])
            for r in self:
                w.writerow([r.layer, r.unit, r.formula, f"{r.iou:.6f}", r.length,
                            " | ".join(r.concepts), " | ".join(r.operators),
                            " | ".join(r.categories), r.intersection, r.union, r.best_concept,
                            r.best_category, f"{r.best_iou:.6f}", r.threshold])
        return path


def save_explanations(explanations: Iterable[Explanation], path: str | Path) -> Path:
    """Write explanations as JSON (:meth:`ExplanationResult.to_json`); a plain list is saved
    with its rows' layer and no settings."""
    if not isinstance(explanations, ExplanationResult):
        rows = list(explanations)
        layers = {r.layer for r in rows if isinstance(r, Explanation)}
        explanations = ExplanationResult(rows, layers.pop() if len(layers) == 1 else "")
    return explanations.to_json(path)


def load_explanations(path: str | Path) -> ExplanationResult:
    """Read explanations written by :func:`save_explanations` or
    :meth:`ExplanationResult.to_json`."""
    return ExplanationResult.from_json(path)
