"""Published Network Dissection results: reading NetDissect's per-unit CSVs, and comparing
two dissections unit by unit.

The CSV formats read (one row per unit, in any order):

- NetDissect (CSAILVision/NetDissect, ``<layer>-result.csv``) and NetDissect-Lite
  (CSAILVision/NetDissect-Lite, ``tally.csv`` in its output folder): ``unit, category, label,
  score``, then per category ``<cat>-label, <cat>-truth, <cat>-activation, <cat>-intersect,
  <cat>-iou``. Units are numbered from 1; rows are sorted by score; numbers are Python's
  ``str`` of the float (``0.48661651443310205``, counts as ``1016043.0``).
- :meth:`DissectionResult.to_csv <dissect.netdissect.DissectionResult.to_csv>`: ``unit,
  category, label, score`` and per category ``<cat>-label, <cat>-iou`` (6 decimals), units from
  0; one ``<layer>.csv`` per layer, or one file with a leading ``layer`` column.

``label``/``score`` name the unit's best concept overall; ``<cat>-label``/``<cat>-iou`` its
best concept within the category (``category``): only these IoUs are known.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .._plumbing.result_files import write_json
from ..datasets.broden_csv import parse_float, parse_int, read_csv
from ..datasets.concepts import Concept
from ..errors import DataError, DissectError
from .result import DissectionResult

log = logging.getLogger(__name__)

TOP_COLUMNS = ("unit", "category", "label", "score")
COUNT_COLUMNS = ("truth", "activation", "intersect")  # NetDissect's and Lite's extra columns
MAX_UNIT = 2**31 - 1
COMPARISON_FORMAT = "torch-dissect-comparison"
_TOL = 1e-6  # agreement of two printed IoUs (ours are printed with 6 decimals)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_TOL, abs_tol=_TOL)


# ------------------------------------------------------------------ reading the CSVs


@dataclass(frozen=True)
class _Row:
    line: int
    unit: int
    category: str
    label: str
    score: float
    best: dict[str, tuple[str, float]]  # category -> (label, IoU); unknown categories absent


def layer_from_file(path: Path) -> str:
    """The layer name of a result CSV: its name without ``.csv``, a ``tally_`` prefix
    (``tally_layer4.csv``) or a ``-result`` suffix (NetDissect's ``conv5-result.csv``).
    NetDissect-Lite names every layer's file ``tally.csv``: that layer is called ``tally``
    (name it with a ``{layer: path}`` dict, or pair it by ``layers=`` when comparing)."""
    name = path.stem
    if name.startswith("tally_") and len(name) > 6:
        name = name[6:]
    if name.endswith("-result") and len(name) > 7:
        name = name[:-7]
    return name


def _files(paths: Any) -> list[tuple[str | None, Path]]:
    """``(layer or None, file)`` for each CSV named by ``paths``."""
    if isinstance(paths, Mapping):
        return [(str(layer), Path(p)) for layer, p in paths.items()]
    if isinstance(paths, (str, Path)):
        path = Path(paths)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
            if not found:
                raise DataError(f"{path} holds no .csv file: expected NetDissect result CSVs "
                                "(tally_<layer>.csv, <layer>-result.csv or <layer>.csv)")
            return [(None, p) for p in found]
        return [(None, path)]
    found = [(None, Path(p)) for p in paths]
    if not found:
        raise DissectError("no CSV file given: pass a file, a folder, a list or {layer: file}")
    return found


def _header_categories(path: Path, line: int, header: list[str]) -> list[str]:
    """The categories of a header, in its order; every needed column checked."""
    missing = [c for c in TOP_COLUMNS if c not in header]
    cats = list(dict.fromkeys(h[: -len("-label")] for h in header
                              if h.endswith("-label") and len(h) > 6))
    cats += [h[:-4] for h in header if h.endswith("-iou") and h[:-4] not in cats and len(h) > 4]
    missing += [f"{c}-{s}" for c in cats for s in ("label", "iou") if f"{c}-{s}" not in header]
    if not missing and not cats:
        return []  # only each unit's best concept: unit, category, label, score
    if missing:
        raise DataError(
            f"{path} line {line}: header {','.join(header)[:200]!r} lacks the columns "
            f"{missing}: expected "
            "NetDissect's columns unit, category, label, score, then (optionally) per category "
            "<cat>-label, <cat>-iou (and, from NetDissect or Lite, <cat>-truth, "
            "<cat>-activation, <cat>-intersect)")
    return cats


def _iou(value: str, path: Path, line: int, column: str) -> float:
    out = parse_float(value, path, line, column)
    if not 0 <= out <= 1 + _TOL:
        raise DataError(f"{path} line {line}: column {column!r} is {value.strip()!r}: an IoU is "
                        "a number from 0 to 1")
    return out


def _check_counts(row: dict[str, str], path: Path, line: int, cat: str, iou: float,
                  disagree: list[int]) -> None:
    """NetDissect's and Lite's ``<cat>-iou`` is ``intersect / (activation + truth -
    intersect)``: the lines where the counts give another IoU are added to ``disagree`` (the
    IoU is what is read; the counts are not used, so a mismatch is warned about, not refused)."""
    cells = [row.get(f"{cat}-{s}", "").strip() for s in COUNT_COLUMNS]
    if not all(cells):
        return
    t, a, i = (parse_float(v, path, line, f"{cat}-{s}") for v, s in zip(cells, COUNT_COLUMNS,
                                                                          strict=True))
    if min(t, a, i) < 0:
        raise DataError(f"{path} line {line}: the {cat}-truth/-activation/-intersect counts "
                        f"{cells} are negative; pixel counts are >= 0")
    union = a + t - i
    expected = i / union if union > 0 else 0.0
    if not _close(iou, expected):
        disagree.append(line)


def _parse_row(row: dict[str, str], path: Path, line: int, cats: list[str],
               unnamed: list[int], disagree: list[int]) -> _Row:
    """One unit's row; the lines of cells with an IoU but no label are added to ``unnamed``,
    those whose counts give another IoU to ``disagree``. Without per-category columns
    (``cats`` empty) the row's ``label`` and ``score`` are its only known cell."""
    unit = parse_int(row["unit"], path, line, "unit", 0, MAX_UNIT)
    best: dict[str, tuple[str, float]] = {}
    if not cats:
        category, label = row["category"].strip(), row["label"].strip()
        if not category or not label or not row["score"].strip():
            raise DataError(f"{path} line {line}: category {category!r}, label {label!r} and "
                            f"score {row['score'].strip()!r}: each unit needs all three")
        score = _iou(row["score"], path, line, "score")
        return _Row(line, unit, category, label, score, {category: (label, score)})
    for cat in cats:
        label, value = row[f"{cat}-label"].strip(), row[f"{cat}-iou"].strip()
        if not label and not value:
            continue  # our to_csv: a category without a known IoU
        if not label and value:  # NetDissect's published ResNet-152 results, texture column
            _check_counts(row, path, line, cat, _iou(value, path, line, f"{cat}-iou"),
                          disagree)
            unnamed.append(line)
            continue  # a concept without a name cannot be compared: the cell stays unknown
        if not value:
            raise DataError(f"{path} line {line}: {cat}-label is {label!r} but {cat}-iou is "
                            f"{value!r}: give both (a label and its IoU) or neither")
        best[cat] = (label, _iou(value, path, line, f"{cat}-iou"))
        _check_counts(row, path, line, cat, best[cat][1], disagree)
    category, label = row["category"].strip(), row["label"].strip()
    if not row["score"].strip():
        raise DataError(f"{path} line {line}: the score column is empty; it holds the IoU of "
                        "the unit's best concept")
    score = _iou(row["score"], path, line, "score")
    if category not in best:
        known = f"not one of the file's categories {cats}" if category not in cats else \
            f"its {category}-label and {category}-iou are empty"
        raise DataError(f"{path} line {line}: category {category!r} is {known}; the category "
                        "column names the category of the unit's best concept")
    if best[category][0] != label or not _close(best[category][1], score):
        raise DataError(
            f"{path} line {line}: label {label!r} with score {score:.6g} disagrees with "
            f"{category}-label {best[category][0]!r} with {category}-iou "
            f"{best[category][1]:.6g}; the score is the IoU of the label in its category")
    top = max(v for _, v in best.values())
    if score < top and not _close(score, top):
        raise DataError(f"{path} line {line}: score {score:.6g} is below the unit's best IoU "
                        f"{top:.6g} in another category; the score is the best IoU overall")
    return _Row(line, unit, category, label, score, best)


def _unit_base(path: Path, layer: str, rows: list[_Row], first_unit: int | str,
               lite: bool) -> int:
    """Check the unit numbers of one layer (each once, no gaps) and return the first one."""
    seen: dict[int, int] = {}
    for r in rows:
        if r.unit in seen:
            raise DataError(f"{path} line {r.line}: unit {r.unit} of layer {layer!r} again (first "
                            f"on line {seen[r.unit]}); each unit has one row")
        seen[r.unit] = r.line
    k, lo, hi = len(rows), min(seen), max(seen)
    hint = "pass first_unit=0 or first_unit=1 (dissect compare: --first-unit 0 or 1)"
    if first_unit == "auto":
        if hi - lo + 1 != k or lo not in (0, 1):
            gap = sorted(set(range(lo, hi + 1)) - set(seen))[:10]
            raise DataError(
                f"{path}: the {k} units of layer {layer!r} are numbered {lo} to {hi}"
                + (f", without {gap}" if gap else "") + ": expected 1 to K (NetDissect) or "
                "0 to K-1 (torch-dissect), every unit once; is the file complete?")
        if lo == 1 and not lite:
            raise DataError(
                f"{path}: the units of layer {layer!r} are numbered 1 to {k} but the file has "
                "torch-dissect's columns (no <cat>-truth/-activation/-intersect), whose units "
                "start at 0: it is either numbered from 1, or unit 0 is missing; " + hint)
        return lo
    if first_unit not in (0, 1) or isinstance(first_unit, bool):
        raise DissectError(f"first_unit is {first_unit!r}: expected 'auto', 0 or 1")
    missing = sorted(set(range(first_unit, first_unit + k)) - set(seen))
    if missing:
        raise DataError(f"{path}: with units numbered from {first_unit}, layer {layer!r} has "
                        f"{k} units but lacks units {missing[:10]} (it has {lo} to {hi}); "
                        "every unit needs a row")
    return first_unit


def _read_file(path: Path, layer: str | None
               ) -> tuple[list[str], dict[str, list[_Row]], bool]:
    """``(categories, {layer: rows}, has Lite's count columns)`` of one CSV file."""
    if not path.is_file():
        raise DataError(f"{path} is not a file: expected a NetDissect result CSV")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: expected a header unit,category,label,score,...")
    rows = read_csv(path, ())
    if not rows:
        raise DataError(f"{path} has a header but no units: is the file cut short?")
    header = list(rows[0][1])
    cats = _header_categories(path, 1, header)
    # NetDissect's format (units from 1): its count columns, or only the four top columns
    lite = not cats or any(f"{c}-{s}" in header for c in cats for s in COUNT_COLUMNS)
    layers: dict[str, list[_Row]] = {}
    by_column = "layer" in header
    unnamed: list[int] = []
    disagree: list[int] = []
    for line, row in rows:
        name = row["layer"].strip() if by_column else layer or layer_from_file(path)
        if not name:
            raise DataError(f"{path} line {line}: the layer column is empty")
        layers.setdefault(name, []).append(_parse_row(row, path, line, cats, unnamed, disagree))
    if disagree:
        log.warning("%s: on %d rows (first on line %d) a category's -intersect / (-activation + "
                    "-truth - -intersect) is not its -iou: is the file edited or damaged? The "
                    "IoUs are read as they are (the counts are not used)", path, len(disagree),
                    disagree[0])
    if not cats:
        cats = list(dict.fromkeys(r.category for rows_ in layers.values() for r in rows_))
    if unnamed:
        log.warning("%s: %d rows (first on line %d) give a category's best IoU without its "
                    "label (NetDissect's published ResNet-152 results do, for texture); those "
                    "cells are left unknown (NaN), so a unit's best concept is its best named "
                    "one", path, len(unnamed), unnamed[0])
    return cats, layers, lite


def read_netdissect_csv(
    paths: str | Path | Sequence[str | Path] | Mapping[str, str | Path],
    *,
    iou_threshold: float = 0.04,
    first_unit: int | str = "auto",
) -> DissectionResult:
    """Read per-unit Network Dissection result CSVs into a :class:`DissectionResult`.

    Parameters
    ----------
    paths
        A CSV file, a folder of them (every ``*.csv`` in it), a list of files, or
        ``{layer: file}``. Layers are named by the ``layer`` column when a file has one, else
        by the file name (:func:`layer_from_file`: ``tally_<layer>.csv``,
        ``<layer>-result.csv``, ``<layer>.csv``) or the dict's key.
    iou_threshold
        A unit is a detector when its best IoU exceeds this (NetDissect's 0.04).
    first_unit
        The number of a layer's first unit in the files: ``0``, ``1``, or ``"auto"``: units
        numbered exactly 0 to K-1 are read from 0; exactly 1 to K from 1 in NetDissect's and
        Lite's format (whose ``<cat>-truth`` columns say so), while in torch-dissect's format
        (numbered from 0) 1 to K is ambiguous (numbered from 1, or unit 0 missing) and refused.
        Gaps and repeats are refused in every mode. Units of the result start at 0.

    Returns
    -------
    DissectionResult
        Concepts: every ``(label, category)`` named with a positive IoU (numbered 1, 2, ... in
        category order, not the dataset's label numbers). ``iou(layer)[k, c]`` is the
        file's IoU where unit ``k``'s best concept in ``c``'s category is ``c``; 0 for every
        concept of a category in which the unit's best IoU is 0 (a label named there is
        argmax's arbitrary pick and makes no concept); NaN (unknown, never a made-up 0)
        elsewhere. Thresholds are NaN, top images ``(K, 0)``, ``quantile`` NaN; ``meta``
        is ``{"source": "netdissect-csv", "files": [...], "first_unit": {layer: 0 or 1}}``.
        ``units(layer)`` then gives each unit's ``label``/``score``, and ``units(layer, cat)``
        its ``<cat>-label``/``<cat>-iou``.

    Raises
    ------
    DataError
        Naming the file and line: a missing column, a malformed number, an IoU outside
        [0, 1], a unit numbered twice or missing, a ``score`` that is not the IoU of
        ``label`` in ``category`` (nor the best of the row), a layer found in two files.

    Notes
    -----
    A file with only the columns ``unit, category, label, score`` is read too (each unit's
    best concept is then its one known cell; units numbered as NetDissect's). Two things in
    real files are read with a warning instead of refused, since neither changes what is read:
    ``<cat>-truth/-activation/-intersect`` counts that do not give ``<cat>-iou``, and a
    category's IoU without its label (NetDissect's own published ResNet-152 CSVs, texture
    column: the cell is left unknown).
    """
    if not (isinstance(iou_threshold, (int, float)) and 0 <= iou_threshold <= 1):
        raise DissectError(f"iou_threshold is {iou_threshold!r}: expected a number in [0, 1]")
    categories: list[str] = []
    layers: dict[str, tuple[Path, list[_Row], bool]] = {}
    files = _files(paths)
    for layer, path in files:
        cats, found, lite = _read_file(path, layer)
        categories += [c for c in cats if c not in categories]
        for name, rows in found.items():
            if name in layers:
                raise DataError(f"layer {name!r} is in both {layers[name][0]} and {path}: "
                                "give each layer once (name files with a {layer: file} dict)")
            layers[name] = (path, rows, lite)
    named = dict.fromkeys((lab, cat) for _, rows, _ in layers.values() for r in rows
                          for cat, (lab, v) in r.best.items() if v > 0)
    # category order, then first appearance (sorted is stable)
    concepts = sorted(named, key=lambda lc: categories.index(lc[1]))
    if not concepts:
        raise DataError(f"no unit of {[str(p) for _, p in files]} has a positive IoU: there is "
                        "no concept to read")
    column = {c: j for j, c in enumerate(concepts)}
    per_cat = {cat: [j for (_, c), j in column.items() if c == cat] for cat in categories}
    ious, bases = {}, {}
    for name, (path, rows, lite) in layers.items():
        bases[name] = _unit_base(path, name, rows, first_unit, lite)
        iou = np.full((len(rows), len(concepts)), np.nan)
        for r in rows:
            for cat, (lab, value) in r.best.items():
                if value > 0:
                    iou[r.unit - bases[name], column[(lab, cat)]] = value
                else:  # the best IoU of the category is 0: so is every concept's in it
                    iou[r.unit - bases[name], per_cat[cat]] = 0.0
        ious[name] = iou
    order = list(layers)
    log.debug("read layers %s from %d NetDissect result file(s)", order, len(files))
    return DissectionResult(
        order, [Concept(i + 1, lab, cat) for i, (lab, cat) in enumerate(concepts)], categories,
        ious, {k: np.full(v.shape[0], np.nan, dtype=np.float32) for k, v in ious.items()},
        {k: np.zeros((v.shape[0], 0), dtype=np.int64) for k, v in ious.items()},
        quantile=float("nan"), iou_threshold=float(iou_threshold),
        meta={"source": "netdissect-csv", "files": [str(p) for _, p in files],
              "first_unit": bases},
    )


# ------------------------------------------------------------------ comparing two results


def load_result(source: DissectionResult | str | Path, *, first_unit: int | str = "auto",
                iou_threshold: float = 0.04) -> DissectionResult:
    """A :class:`DissectionResult` from itself, a results folder or ``netdissect.json``
    (:meth:`~DissectionResult.from_json`), or NetDissect CSVs: a ``.csv`` file or a folder of
    them (:func:`read_netdissect_csv`, with ``first_unit`` and ``iou_threshold``)."""
    if isinstance(source, DissectionResult):
        return source
    path = Path(source)
    csvs = dict(first_unit=first_unit, iou_threshold=iou_threshold)
    if path.is_dir():
        if (path / "netdissect.json").is_file():
            return DissectionResult.from_json(path / "netdissect.json")
        if any(p.suffix.lower() == ".csv" for p in path.iterdir()):
            return read_netdissect_csv(path, **csvs)
        raise DataError(f"{path} holds neither netdissect.json nor .csv files: expected a "
                        "results folder of `dissect netdissect` or NetDissect result CSVs")
    if not path.exists():
        raise DataError(f"{path} does not exist: expected a results folder, netdissect.json or "
                        "a NetDissect result CSV")
    if path.suffix.lower() == ".json":
        return DissectionResult.from_json(path)
    if path.suffix.lower() == ".csv":
        return read_netdissect_csv(path, **csvs)
    raise DataError(f"{path} is neither a folder, a .json nor a .csv file: expected a results "
                    "folder, netdissect.json or a NetDissect result CSV")


@dataclass(frozen=True)
class LayerComparison:
    """How two dissections of one layer agree.

    Attributes
    ----------
    layer_a, layer_b
        The layer's name on each side.
    units
        Units compared (both sides have this many).
    same_top
        Units whose best concept (name and category) is the same on both sides; a unit whose
        best IoU is 0 or unknown on either side has no best concept and never counts.
    detectors_a, detectors_b
        Units whose best IoU exceeds that side's ``iou_threshold``.
    detectors_both
        Units that are detectors on both sides.
    same_top_detectors
        Of those, the units with the same best concept.
    unique_a, unique_b
        Unique detectors, first definition: distinct concept names among the detectors' best
        concepts (what :meth:`DissectionResult.summary` counts).
    unique_per_category_a, unique_per_category_b
        Unique detectors as the NetDissect paper's plots count them (CSAILVision/NetDissect,
        ``plot/extract_csv.m``): for each category, the distinct labels among the units whose
        best IoU *within that category* exceeds the threshold (whether or not the category is
        the unit's best), summed over categories. A unit can count in several categories and
        a name in two categories counts twice, so this is >= ``unique_*``.
    """

    layer_a: str
    layer_b: str
    units: int
    same_top: int
    detectors_a: int
    detectors_b: int
    detectors_both: int
    same_top_detectors: int
    unique_a: int
    unique_b: int
    unique_per_category_a: int
    unique_per_category_b: int


def _unique_per_category(result: DissectionResult, layer: str) -> int:
    return sum(len({u.concept for u in result.units(layer, cat) if u.iou > result.iou_threshold})
               for cat in result.categories)


def _top(u: Any) -> tuple[str, str] | None:
    return (u.concept, u.category) if u.iou > 0 else None  # NaN > 0 is False


def _pairs(a: DissectionResult, b: DissectionResult,
           layers: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if layers is None:
        pairs = [(name, name) for name in a.layers if name in b.layers]
        if not pairs:
            raise DissectError(f"the results share no layer: A has {a.layers}, B has {b.layers}; "
                               "pair layers by name with layers={'a_layer': 'b_layer'} "
                               "(dissect compare: --layers a_layer=b_layer)")
        return pairs
    pairs = [(str(x), str(y)) for x, y in layers.items()]
    for side, result, names in (("A", a, [x for x, _ in pairs]), ("B", b, [y for _, y in pairs])):
        unknown = [n for n in names if n not in result.layers]
        if unknown:
            raise DissectError(f"{side} has no layer {unknown}; its layers are {result.layers}")
    if not pairs:
        raise DissectError("layers={} pairs no layers: name at least one pair")
    return pairs


def compare_layer(a: DissectionResult, b: DissectionResult, layer_a: str,
                  layer_b: str) -> LayerComparison:
    """Compare one layer of ``a`` with one layer of ``b`` (see :class:`LayerComparison`)."""
    ua, ub = a.units(layer_a), b.units(layer_b)
    ka, kb = a.iou(layer_a).shape[0], b.iou(layer_b).shape[0]
    if ka != kb:
        raise DissectError(f"layer {layer_a!r} of A has {ka} units but layer {layer_b!r} of B "
                           f"has {kb}: units can be compared only between layers of one size")
    same = [_top(x) is not None and _top(x) == _top(y) for x, y in zip(ua, ub, strict=True)]
    both = [x.is_detector and y.is_detector for x, y in zip(ua, ub, strict=True)]
    return LayerComparison(
        layer_a, layer_b, ka, sum(same),
        sum(u.is_detector for u in ua), sum(u.is_detector for u in ub), sum(both),
        sum(s and d for s, d in zip(same, both, strict=True)),
        len({u.concept for u in ua if u.is_detector}),
        len({u.concept for u in ub if u.is_detector}),
        _unique_per_category(a, layer_a), _unique_per_category(b, layer_b),
    )


@dataclass(frozen=True)
class Comparison:
    """Two dissections compared layer by layer (:func:`compare_results`).

    Attributes
    ----------
    rows
        One :class:`LayerComparison` per pair of layers.
    a, b
        What was compared (a path, or ``"A"``/``"B"`` for objects).
    iou_threshold_a, iou_threshold_b
        Each side's detector threshold.
    """

    rows: tuple[LayerComparison, ...]
    a: str
    b: str
    iou_threshold_a: float
    iou_threshold_b: float

    def summary(self) -> str:
        """The comparison as a table, one line per layer."""
        lines = [f"A: {self.a} (detectors: IoU > {self.iou_threshold_a})",
                 f"B: {self.b} (detectors: IoU > {self.iou_threshold_b})"]
        head = ["layer", "units", "same top", "detectors A", "detectors B", "both",
                "same top (both)", "unique A", "unique B", "per-cat A", "per-cat B"]
        body = [[r.layer_a if r.layer_a == r.layer_b else f"{r.layer_a} / {r.layer_b}",
                 *(str(getattr(r, f.name)) for f in fields(LayerComparison)[2:])]
                for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
        for row in (head, *body):
            lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                                   for i, (x, w) in enumerate(zip(row, widths, strict=True))))
        lines += ["same top: units with the same best concept (name and category); both: "
                  "units that are detectors on both sides",
                  "unique: distinct best concepts of the detectors; per-cat: distinct labels "
                  "per category among the units above the threshold in it, summed over "
                  "categories (as NetDissect's plots count)"]
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> Path:
        """Write the comparison as JSON (``path``: the file)."""
        return write_json(path, {"format": COMPARISON_FORMAT, "version": 1, "a": self.a,
                                 "b": self.b, "iou_threshold_a": self.iou_threshold_a,
                                 "iou_threshold_b": self.iou_threshold_b,
                                 "rows": [asdict(r) for r in self.rows]}, indent=1)

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per layer pair as CSV, with the field names of
        :class:`LayerComparison` as its header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([x.name for x in fields(LayerComparison)])
            w.writerows([getattr(r, x.name) for x in fields(LayerComparison)] for r in self.rows)
        return path


def compare_results(
    a: DissectionResult | str | Path,
    b: DissectionResult | str | Path,
    *,
    layers: Mapping[str, str] | None = None,
) -> Comparison:
    """Compare two dissections of the same network unit by unit.

    Parameters
    ----------
    a, b
        :class:`DissectionResult` objects, or paths (:func:`load_result`: a results folder,
        ``netdissect.json``, or NetDissect result CSVs read with ``first_unit="auto"``; read
        them yourself with :func:`read_netdissect_csv` for other settings).
    layers
        ``{layer of a: layer of b}`` to pair (e.g. ``{"layer4": "tally"}`` for Lite's
        ``tally.csv``); default: the layers with the same name on both sides.

    Returns
    -------
    Comparison

    Raises
    ------
    DissectError
        When no layer is shared (both sides' layers are listed), a named layer is missing, or
        paired layers have different numbers of units.
    """
    names = [x if isinstance(x, DissectionResult) else str(x) for x in (a, b)]
    ra, rb = load_result(a), load_result(b)
    rows = tuple(compare_layer(ra, rb, x, y) for x, y in _pairs(ra, rb, layers))
    return Comparison(rows, names[0] if isinstance(names[0], str) else "A",
                      names[1] if isinstance(names[1], str) else "B",
                      float(ra.iou_threshold), float(rb.iou_threshold))
