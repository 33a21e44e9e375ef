"""The result of :func:`~dissect.ablation.ablate`: :class:`AblationResult`."""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._plumbing.arrays import decode_array, encode_array
from .._plumbing.result_files import read_json, result_path, write_json
from ..errors import DissectError

FORMAT = "torch-dissect-ablation"
VERSION = 1

METRICS = ("accuracy", "logit", "probability")
MODES = ("zero", "mean")
#: what a row removes: "each" one unit per row (row i removes ``units[i]``); "set" every unit
#: of ``units`` at once (one row); "keep" every unit *except* ``units`` (one row)
REMOVALS = ("each", "set", "keep")


def _ints(values: Any, what: str) -> list[int]:
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise DissectError(f"{what} must be a list of ints, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise DissectError(f"{what} must hold ints, got {v!r}")
        out.append(int(v))
    return out


class AblationResult:
    """What removing units of a layer does to each class (made by :func:`ablate`).

    Attributes
    ----------
    layer
        The ablated layer.
    units
        ``removal="each"``: the unit removed in each row (row ``i`` removes ``units[i]``).
        ``"set"`` and ``"keep"``: the units of the one row (removed together, or the only ones
        kept).
    classes
        int64 ``(n_classes,)``: the class (model output index) of each column.
    counts
        int64 ``(n_classes,)``: samples of each class (its target, or its unablated
        prediction when no targets were given).
    baseline
        float64 ``(n_classes,)``: the metric of each class, nothing removed.
    ablated
        float64 ``(rows, n_classes)``: the metric with the row's units removed; ``rows`` is
        ``len(units)`` for ``removal="each"`` and 1 otherwise.
    metric
        ``"accuracy"`` (the fraction of the class's samples predicted as the class), ``"logit"``
        (the mean of the class's own logit over its samples) or ``"probability"`` (the mean of
        its softmax probability).
    mode
        ``"zero"`` (removed units set to 0) or ``"mean"`` (to their dataset mean: :attr:`means`).
    removal
        ``"each"``, ``"set"`` or ``"keep"`` (see :attr:`units`).
    means
        float64 ``(C,)``: each unit's mean over the dataset and positions (``mode="mean"``),
        else ``None``.
    settings
        How it was computed (samples, targets given or predicted, engine, concept, ...).

    Notes
    -----
    A class with no samples (only possible when ``classes=`` asked for it) has NaN in
    ``baseline``, ``ablated`` and ``drop``: there is nothing to measure, and NaN says so where
    0 would read as "no effect". :meth:`top` skips such classes and :meth:`summary` counts
    them.
    """

    def __init__(self, layer: str, units: Sequence[int], classes: Any, counts: Any,
                 baseline: Any, ablated: Any, *, metric: str, mode: str, removal: str = "each",
                 means: Any = None, settings: dict[str, Any] | None = None) -> None:
        if not isinstance(layer, str):
            raise DissectError(f"layer must be a string, got {type(layer).__name__}")
        self.layer = layer
        self.units = _ints(units, "units")
        self.classes = np.asarray(_ints(classes, "classes"), dtype=np.int64)
        self.counts = np.asarray(_ints(counts, "counts"), dtype=np.int64)
        if metric not in METRICS or mode not in MODES or removal not in REMOVALS:
            raise DissectError(f"unknown metric/mode/removal {metric!r}/{mode!r}/{removal!r}")
        self.metric, self.mode, self.removal = metric, mode, removal
        try:
            self.baseline = np.asarray(baseline, dtype=np.float64)
            self.ablated = np.asarray(ablated, dtype=np.float64)
            self.means = None if means is None else np.asarray(means, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DissectError(f"ablation values are not numbers: {exc}") from exc
        n = len(self.classes)
        rows = len(self.units) if removal == "each" else 1
        if self.counts.shape != (n,) or self.baseline.shape != (n,):
            raise DissectError(f"{n} classes but counts {self.counts.shape} and baseline "
                               f"{self.baseline.shape}")
        if self.ablated.shape != (rows, n):
            raise DissectError(f"ablated has shape {self.ablated.shape}, expected {(rows, n)} "
                               f"({rows} rows of removal={removal!r}, {n} classes)")
        if self.means is not None and self.means.ndim != 1:
            raise DissectError(f"means must be one value per unit, got {self.means.shape}")
        if removal == "each" and len(set(self.units)) != len(self.units):
            raise DissectError("a unit is listed twice")
        self.settings = dict(settings or {})

    # ------------------------------------------------------------------ access

    @property
    def drop(self) -> np.ndarray:
        """float64 ``(rows, n_classes)``: ``baseline - ablated`` (positive: the class lost)."""
        return self.baseline[None, :] - self.ablated

    def row(self, unit: int | None = None) -> int:
        """The row of ``unit`` (``removal="each"``); for a one-row result, 0 (``unit`` may be
        ``None`` or any of its units)."""
        if self.removal != "each":
            if unit is not None and unit not in self.units:
                raise DissectError(f"unit {unit!r} is not one of this result's units "
                                   f"{self.units}")
            return 0
        if unit not in self.units:
            raise DissectError(f"unit {unit!r} was not ablated; units: {self.units[:20]}"
                               + (" ..." if len(self.units) > 20 else ""))
        return self.units.index(unit)

    def top(self, unit: int | None = None, k: int = 5) -> list[int]:
        """The ``k`` classes whose metric drops most when ``unit`` is removed.

        Parameters
        ----------
        unit
            A unit of :attr:`units` (``removal="each"``). For a one-row result (``"set"``,
            ``"keep"``) ``None`` or any of its units: the one row.
        k
            How many classes.

        Returns
        -------
        list of int
            Class indices (values of :attr:`classes`), largest drop first (ties: the lower
            class first). Classes without samples (NaN) are left out, so fewer than ``k``
            may come back. Their drops: ``result.drop[result.row(unit)]``.
        """
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise DissectError(f"k must be a positive integer, got {k!r}")
        drop = self.drop[self.row(unit)]
        valid = np.flatnonzero(~np.isnan(drop))
        order = valid[np.lexsort((self.classes[valid], -drop[valid]))]
        return [int(c) for c in self.classes[order[: int(k)]]]

    def __len__(self) -> int:
        return self.ablated.shape[0]

    def __repr__(self) -> str:
        return (f"AblationResult({self.layer!r}, {len(self)} rows x {len(self.classes)} "
                f"classes, metric={self.metric!r}, removal={self.removal!r})")

    # ------------------------------------------------------------------ text

    def _row_name(self, i: int) -> str:
        if self.removal == "each":
            return f"unit {self.units[i]}"
        what = "kept" if self.removal == "keep" else "removed"
        concept = self.settings.get("concept")
        return (f"{concept!r} detectors " if concept else "") + f"{len(self.units)} units {what}"

    def summary(self, rows: int = 20, k: int = 3) -> str:
        """The rows with the largest mean drop, each with the classes it hurts most.

        Parameters
        ----------
        rows
            How many rows to list (the largest mean drop over classes first).
        k
            Classes shown per row.
        """
        s = self.settings
        n = len(self.classes)
        empty = int((self.counts == 0).sum())
        source = "targets" if s.get("targets") == "given" else "unablated predictions"
        lines = [
            f"Ablation of layer {self.layer!r}: metric={self.metric}, mode={self.mode}, "
            f"removal={self.removal}, {s.get('n_samples', int(self.counts.sum()))} samples, "
            f"{n} classes (samples grouped by {source})"]
        if self.removal != "each":
            shown = ", ".join(map(str, self.units[:30])) + (" ..." if len(self.units) > 30
                                                             else "")
            lines.append(f"units {'kept' if self.removal == 'keep' else 'removed'}: {shown}")
        if empty:
            lines.append(f"NOTE: {empty} of {n} classes have no samples: their values are NaN "
                         "(not measured), not 0")
        with np.errstate(all="ignore"):
            base = np.nanmean(self.baseline) if n > empty else math.nan
            mean_drop = (np.nanmean(self.drop, axis=1) if n > empty
                         else np.full(len(self), math.nan))
        lines.append(f"baseline {self.metric} (mean over classes): {base:.4g}")
        order = np.argsort(-np.nan_to_num(mean_drop, nan=-np.inf), kind="stable")
        width = max(len(self._row_name(i)) for i in order[:rows]) if len(self) else 4
        lines.append(f"{'row':<{width}} {'mean drop':>10}  classes dropping most (drop)")
        for i in order[:rows]:
            unit = self.units[i] if self.removal == "each" else None
            tops = self.top(unit, k) if n > empty else []
            col = {int(c): j for j, c in enumerate(self.classes)}
            text = ", ".join(f"{c} ({self.drop[i, col[c]]:+.3g})" for c in tops)
            lines.append(f"{self._row_name(i):<{width}} {mean_drop[i]:>10.4g}  {text or '-'}")
        if len(self) > rows:
            lines.append(f"... {len(self) - rows} more rows")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files

    def to_csv(self, path: str | Path) -> Path:
        """One line per (row, class): ``row, units, class, count, baseline, ablated, drop``
        (NaN as an empty cell). ``path`` is the file, or an existing folder to write
        ``ablation.csv`` in."""
        path = result_path(path, "ablation.csv")
        path.parent.mkdir(parents=True, exist_ok=True)

        def num(v: float) -> str:
            return "" if math.isnan(v) else f"{v:.9g}"

        drop = self.drop
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["row", "units", "class", "count", "baseline", "ablated", "drop"])
            for i in range(len(self)):
                units = (str(self.units[i]) if self.removal == "each"
                         else ";".join(map(str, self.units)))
                for j, c in enumerate(self.classes):
                    w.writerow([i, units, int(c), int(self.counts[j]), num(self.baseline[j]),
                                num(self.ablated[i, j]), num(drop[i, j])])
        return path

    def to_json(self, path: str | Path) -> Path:
        """Everything as one JSON file (the values exactly, NaN included).

        ``path`` is the file, or an existing folder to write ``ablation.json`` in.
        """
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "layer": self.layer,
            "units": self.units,
            "classes": self.classes.tolist(),
            "counts": self.counts.tolist(),
            "metric": self.metric,
            "mode": self.mode,
            "removal": self.removal,
            "baseline": encode_array(self.baseline),
            "ablated": encode_array(self.ablated),
            "means": None if self.means is None else encode_array(self.means),
            "settings": self.settings,
        }
        return write_json(result_path(path, "ablation.json"), doc)

    @classmethod
    def from_json(cls, path: str | Path) -> AblationResult:
        """Load a result written by :meth:`to_json`."""
        path = result_path(path, "ablation.json")
        doc = read_json(path, FORMAT, VERSION, "ablation result")
        try:
            settings = doc.get("settings", {})
            if not isinstance(settings, dict):
                raise ValueError("settings is not an object")
            means = doc["means"]
            return cls(doc["layer"], doc["units"], doc["classes"], doc["counts"],
                       decode_array(doc["baseline"], "baseline"),
                       decode_array(doc["ablated"], "ablated"),
                       metric=doc["metric"], mode=doc["mode"], removal=doc["removal"],
                       means=None if means is None else decode_array(means, "means"),
                       settings=settings)
        except (KeyError, TypeError, ValueError, DissectError) as exc:
            raise DissectError(f"{path} is a damaged ablation result: {exc}") from exc
