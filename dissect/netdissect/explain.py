"""Compositional explanations of units (Mu & Andreas, NeurIPS 2020): :func:`explain` searches
logical formulas of concepts (AND, OR, AND NOT) whose masks best match each unit's active
pixels, scoring every candidate's IoU exactly.

The modules behind it: :mod:`.explain_counts` (one pass over the annotations and activations:
pixels grouped into entries carrying one set of concepts, each unit's active pixels counted per
entry), :mod:`.explain_search` (the beam search: every candidate's counts from histograms over
entries, never a dense mask) and :mod:`.explain_result` (:class:`Explanation`,
:class:`ExplanationResult`, JSON and CSV files).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._plumbing.checks import positive_int, unit_list, units_in_range
from .._plumbing.device import resolve_device
from .._plumbing.progress import progress_bar
from .._plumbing.store_layers import store_layers
from ..datasets.concepts import Concept
from ..datasets.sources import resolve_data
from ..errors import DissectError
from ..store import ActivationStore
from .explain_counts import count_entries
from .explain_result import (
    Explanation,
    ExplanationResult,
    load_explanations,
    save_explanations,
)
from .explain_search import (
    OPERATORS,
    FormulaCounts,
    Key,
    Scored,
    UnitView,
    concepts_of,
    start,
    step,
)
from .run import _check_dataset, _thresholds
from .tally import _resolve_engine

__all__ = ["OPERATORS", "Explanation", "ExplanationResult", "explain", "formula_text",
           "load_explanations", "save_explanations"]

log = logging.getLogger(__name__)


def _operators(operators: Sequence[str] | str) -> tuple[int, ...]:
    """Indices into :data:`OPERATORS` (sorted, repeats dropped) of the operators asked for;
    case and repeated spaces do not matter (``"and not"`` is ``"AND NOT"``)."""
    if isinstance(operators, str):
        operators = [operators]
    try:
        asked = list(operators)
    except TypeError:
        raise DissectError(f"operators must be a list of {', '.join(OPERATORS)}; got "
                           f"{type(operators).__name__}") from None
    out = set()
    for op in asked:
        name = " ".join(str(op).upper().split()) if isinstance(op, str) else None
        if name not in OPERATORS:
            raise DissectError(f"unknown operator {op!r}: choose among {', '.join(OPERATORS)}")
        out.add(OPERATORS.index(name))
    if not out:
        raise DissectError(f"no operators given: choose among {', '.join(OPERATORS)} "
                           "(or length=1 for single concepts)")
    return tuple(sorted(out))


def concept_names(concepts: Sequence[Concept]) -> list[str]:
    """How each concept is written in formulas: its name; ``category:name`` when concepts of
    several categories share the name; ``category:name#number`` when the name also repeats
    within the category."""
    names = Counter(c.name for c in concepts)
    pairs = Counter((c.category, c.name) for c in concepts)
    out = []
    for c in concepts:
        if names[c.name] == 1:
            out.append(c.name)
        elif pairs[c.category, c.name] == 1:
            out.append(f"{c.category}:{c.name}")
        else:
            out.append(f"{c.category}:{c.name}#{c.number}")
    return out


def formula_text(key: Key, names: Sequence[str]) -> str:
    """A formula ``(c0, op1, c1, ...)`` as text: ``"c0"``, ``"(c0 op1 c1)"``,
    ``"((c0 op1 c1) op2 c2)"`` (concept columns written with ``names``)."""
    text = names[key[0]]
    for op, c in zip(key[1::2], key[2::2], strict=True):
        text = f"({text} {OPERATORS[op]} {names[c]})"
    return text


def _units(units: Any, channels: int, layer: str) -> list[int]:
    if units is None:
        return list(range(channels))
    chosen = list(dict.fromkeys(unit_list(units)))  # order kept, repeats dropped
    units_in_range(chosen, channels, layer)
    return chosen


def explain(
    store: ActivationStore,
    dataset: Any,
    layer: str,
    units: int | Sequence[int] | None = None,
    *,
    length: int = 3,
    beam: int = 5,
    operators: Sequence[str] = OPERATORS,
    quantile: float = 0.005,
    categories: list[str] | None = None,
    progress: bool = True,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    annotation_cache: bool | str | Path | None = True,
) -> ExplanationResult:
    """Explain units by logical formulas of concepts (Mu & Andreas, NeurIPS 2020).

    For each unit, a beam search over formulas of up to ``length`` concepts joined by
    ``operators`` finds the formula whose mask best matches the unit's active pixels (IoU).

    Parameters
    ----------
    store
        An :class:`~dissect.ActivationStore` captured over ``dataset`` with ``pool=None``
        (rows aligned by its ``/index``), as for :func:`~dissect.netdissect.dissect`.
    dataset
        A concept dataset (``concepts``, ``categories``, items with label planes), or a
        data-source spec naming one, as the CLI's ``--data`` (``"synthetic:N"``,
        ``"broden:PATH"``, a Broden folder; :func:`dissect.datasets.resolve_data`).
    layer
        The layer to explain (a name of the store).
    units
        The units (channels) to explain, in this order (default: all).
    length
        The most concepts in a formula (1: single concepts, :func:`dissect`'s labels).
    beam
        Formulas kept per unit at each step of the search.
    operators
        The operators formulas may use: any of ``"AND"``, ``"OR"``, ``"AND NOT"``.
    quantile
        Top fraction of activations that counts as active (as :func:`dissect`).
    categories
        Use only concepts of these categories (default: all).
    progress
        Show progress bars.
    batch_size
        Images per counting step.
    device
        Where active pixels are counted, as for :func:`dissect` (``None``: CUDA when
        available, else the CPU; numba's compiled kernel on the CPU). The search runs on the
        CPU.
    num_workers
        DataLoader workers reading the annotations.
    annotation_cache
        The annotation cache, as for :func:`dissect` (``True``: the default folder; a
        folder; ``False``: none).

    Returns
    -------
    ExplanationResult
        A list of :class:`Explanation`, one per unit in the order of ``units`` (``unit``,
        ``formula``, ``iou``, and the formula's structure, counts, the best single concept and
        the threshold), with ``to_json`` / ``from_json`` / ``to_csv`` / ``summary`` and the
        settings in ``meta``.

    Notes
    -----
    *Active pixels* are exactly :func:`dissect`'s: the threshold ``T_k`` is the exact
    ``(1 - quantile)`` quantile of the unit's finite activations over the whole store (the same
    function computes it; non-finite values are left out and warned about once), each map is
    upsampled bilinearly to the segmentation size and a pixel is active when its value is
    finite and ``> T_k`` (counted by the same engines).

    *Images counted.* A formula is evaluated on its *domain*: the images on which every
    category of its concepts is annotated. ``IoU(F) = |A & F| / |(A | F) & domain(F)|``, all
    three counted over the domain (``F`` true where its formula holds on the pixel's concepts;
    an image-level label (scene, texture) covers every pixel of its image; a concept present in
    several planes of a pixel counts once). For one concept the domain is the images on which
    its category is annotated: :func:`dissect`'s ``area="annotated"`` rule, so a length-1
    formula's IoU equals :func:`dissect`'s IoU for that concept, bit for bit. (One exception:
    a label found on an image where its concept's category is not annotated is left out here,
    while :func:`dissect` counts it in ``I`` and ``L``; when that happens a warning names the
    concepts. Broden and SyntheticConcepts never do it.)

    *Search.* Step 1 keeps the ``beam`` best single concepts. Each further step extends every
    formula that entered the beam in the last step by one concept (``F op c``, for every
    operator and every scored concept ``c`` not already in ``F``: left-nested formulas as
    Mu & Andreas build them), and the beam becomes the ``beam`` best of itself and the new
    candidates. (Extending a formula again in a later step would only repeat candidates
    already beaten: the beam's worst only improves.) The result is the beam's best formula.
    Every candidate's IoU is exact (integer counts).

    *Ties* are broken deterministically: higher IoU first, then fewer concepts, then the
    formula read left to right (``c0, op1, c1, ...``), concepts in the dataset's concept-table
    order and operators in the order AND, OR, AND NOT. So ``"(red AND circle)"`` is preferred to
    the equal ``"(circle AND red)"`` when red comes first in the table, and a unit that is
    never active (``T_k = inf``) or whose every IoU is 0 gets the first concept, with IoU 0.

    *Cost.* One pass over the annotations and activations (about a :func:`dissect` pass),
    then the search works on the entries (pixels of one image carrying one set of concepts):
    each candidate's counts come from histograms over the unit's active entries and over the
    formula's entries, shared by all the units whose beam holds the formula.
    """
    dataset, _ = resolve_data(dataset)
    _check_dataset(dataset)
    if not isinstance(store, ActivationStore):
        raise DissectError(f"store must be an ActivationStore, not {type(store).__name__} "
                           "(capture the model first: dissect.capture(..., pool=None))")
    length = positive_int(length, "length")
    beam = positive_int(beam, "beam")
    positive_int(batch_size, "batch_size")
    positive_int(num_workers, "num_workers", minimum=0)
    ops = _operators(operators)
    if not 0 < quantile < 1:
        raise DissectError(f"quantile must be in (0, 1), got {quantile}")
    if not isinstance(layer, str):
        raise DissectError(f"layer must be one layer name, not {type(layer).__name__}")
    if not store.complete:
        raise DissectError(f"{store.path} is an unfinished capture: rerun capture to finish it")
    (layer,) = store_layers(store, layer, what="explain")
    shape = store[layer].shape
    if len(shape) != 4:
        raise DissectError(f"layer {layer!r} is stored as {shape}: explanations need spatial "
                           "maps (N, C, H, W); capture with pool=None")
    chosen = _units(units, shape[1], layer)
    all_cats = list(dataset.categories)
    if categories is not None:
        if isinstance(categories, str):
            categories = [categories]
        unknown = sorted(set(categories) - set(all_cats))
        if unknown:
            raise DissectError(f"unknown categories {unknown}; the dataset has {all_cats}")
    keep = set(categories or all_cats)
    concepts = [c for c in dataset.concepts if c.category in keep and c.number != 0]
    if not concepts:
        raise DissectError(f"no concepts to explain with in the categories {sorted(keep)}")
    missing = {c.category for c in concepts} - set(all_cats)
    if missing:
        raise DissectError(f"concepts name categories {sorted(missing)} the dataset lacks")
    index = store.index
    if len(index) and (index.min() < 0 or index.max() >= len(dataset)):
        raise DissectError(f"{store.path} rows index items beyond the dataset's {len(dataset)}: "
                           "was it captured over another dataset?")
    dev = resolve_device(device)
    engine = _resolve_engine("auto", dev)
    began = time.perf_counter()

    thresholds, found = _thresholds(store, [layer], range(len(store)), quantile, dev, None)
    found[layer].warn()
    thr = np.asarray(thresholds[layer])[chosen]
    numbers = np.array([c.number for c in concepts], dtype=np.int64)
    cat_index = {c: i for i, c in enumerate(all_cats)}
    concept_cat = np.array([cat_index[c.category] for c in concepts], dtype=np.int64)
    entries, counts = count_entries(
        store, layer, chosen, thr, dataset, numbers, concept_cat, len(all_cats),
        batch_size=batch_size, device=dev, engine=engine, num_workers=num_workers,
        annotation_cache=annotation_cache, progress=progress)
    counted = time.perf_counter()
    if entries.dropped.any():
        bad = [f"{concepts[i].name} ({int(entries.dropped[i])} px)"
               for i in np.flatnonzero(entries.dropped)]
        log.warning("explain %s: labels on images where their category is not annotated were "
                    "left out (single-concept IoUs of these concepts differ from dissect()'s, "
                    "which counts them): %s", layer, ", ".join(bad[:10])
                    + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))

    formulas = FormulaCounts(entries, concept_cat)
    searches = []
    with progress_bar(len(chosen), f"explain {layer}: step 1/{length}", progress,
                      unit="unit") as bar:
        for u in range(len(chosen)):
            searches.append(start(UnitView(formulas, *counts.unit(u)), beam))
            bar.update(1)
    for s in range(2, length + 1):
        todo = sum(1 for search in searches if search.fresh)
        with progress_bar(todo, f"explain {layer}: step {s}/{length}", progress,
                          unit="unit") as bar:
            step(formulas, counts, searches, beam, ops, lambda: bar.update(1))

    names = concept_names(concepts)
    rows = []
    for u, search in zip(chosen, searches, strict=True):
        best: Scored = search.beam[0]
        single = search.best_single or best
        cols = concepts_of(best.key)
        rows.append(Explanation(
            unit=int(u), formula=formula_text(best.key, names), iou=best.iou, layer=layer,
            concepts=tuple(names[c] for c in cols),
            operators=tuple(OPERATORS[o] for o in best.key[1::2]),
            categories=tuple(concepts[c].category for c in cols),
            numbers=tuple(int(concepts[c].number) for c in cols),
            intersection=best.intersection, union=best.union,
            best_concept=names[single.key[0]], best_category=concepts[single.key[0]].category,
            best_iou=single.iou, threshold=float(thresholds[layer][u])))
    done = time.perf_counter()
    meta = {
        "length": length, "beam": beam, "operators": [OPERATORS[o] for o in ops],
        "quantile": quantile, "categories": [c for c in all_cats if c in keep],
        "n_concepts": len(concepts), "n_images": int(len(index)), "store": str(store.path),
        "model": store.meta.get("model"), "n_entries": entries.n_entries,
        "n_active_entries": int(counts.ptr[-1]),
        "nonfinite": found[layer].total,
        "seconds": {"count": round(counted - began, 3), "search": round(done - counted, 3)},
    }
    log.info("explain %s: %d units, %d entries; counting %.1f s, search %.1f s", layer,
             len(chosen), entries.n_entries, counted - began, done - counted)
    return ExplanationResult(rows, layer, meta)
