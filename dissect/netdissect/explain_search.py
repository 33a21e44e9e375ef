"""The beam search of :func:`~dissect.netdissect.explain.explain`: every candidate formula's IoU,
exactly, from counts over entries (:mod:`.explain_counts`).

A formula ``F`` is evaluated on its *domain* ``S_F``: the images on which every category of its
concepts is annotated. ``IoU(F) = |A & F| / |(A | F) & S_F|`` for a unit's active pixels ``A``,
with ``F`` restricted to ``S_F``. Extending ``F`` by a concept ``c`` of category ``cat(c)`` gives
``G`` with ``S_G = S_F & annotated(cat(c))``; over ``S_G``, with ``c``'s pixels lying where
``cat(c)`` is annotated (:mod:`.explain_counts` keeps them only there)::

    |G|         AND: |F c|          OR: |F|_c + |c|_F - |F c|     AND NOT: |F|_c - |F c|
    |A G|       AND: |A F c|        OR: |A F|_c + |A c|_F - |A F c|
                                                           AND NOT: |A F|_c - |A F c|
    |A & S_G|   = |A|_{F, c}
    IoU(G)      = |A G| / (|A & S_G| + |G| - |A G|)   (0 when the union is empty)

where ``_c`` restricts to images annotated for ``cat(c)`` and ``_F`` to ``S_F``. For all
concepts ``c`` at once these are a few histograms: concepts over ``F``'s entries weighted by
their sizes (``|F c|``, shared by every unit whose beam holds ``F``), concepts over the unit's
active entries inside ``F`` (``|A F c|``) and inside ``S_F`` (``|A c|_F``), and per-category sums
(``|F|_c``, ``|A F|_c``, ``|A|_{F, c}``). Counts are integers held exactly in float64 (below
2**53), and ``IoU`` is their quotient in float64, as :meth:`.IoUTally.result` computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .explain_counts import Entries, UnitCounts

OPERATORS = ("AND", "OR", "AND NOT")
_AND, _OR, _AND_NOT = 0, 1, 2
MASK_BUDGET = 1 << 28  # bytes of concept masks kept between formulas

#: A formula as ``(c0, op1, c1, op2, c2, ...)``: concept columns and indices into
#: :data:`OPERATORS`, built left to right (``((c0 op1 c1) op2 c2)``).
Key = tuple[int, ...]


@dataclass(frozen=True)
class Scored:
    """A formula of one unit with its exact counts."""

    key: Key
    iou: float
    intersection: int
    union: int

    def order(self) -> tuple[float, int, Key]:
        """The beam's order: higher IoU first, then fewer concepts, then the key."""
        return (-self.iou, len(self.key), self.key)


def concepts_of(key: Key) -> tuple[int, ...]:
    """The concept columns of a formula, in order."""
    return key[0::2]


class FormulaCounts:
    """Counts of formulas over the entries, shared by every unit.

    Parameters
    ----------
    entries
        The run's :class:`~.explain_counts.Entries`.
    concept_category
        ``(C,)`` category index of every concept column.
    """

    def __init__(self, entries: Entries, concept_category: np.ndarray) -> None:
        self.entries = entries
        self.category = np.asarray(concept_category, dtype=np.int64)
        self.C = len(self.category)
        self.N = len(entries.annotated)
        self.ann = entries.annotated.astype(np.float64)  # (N, n_categories)
        self.size = entries.size.astype(np.float64)
        self._concepts: dict[int, np.ndarray] = {}
        self._domains: dict[tuple[int, ...], np.ndarray] = {}
        self._areas: dict[tuple[int, ...], np.ndarray] = {}

    def categories(self, key: Key) -> tuple[int, ...]:
        """The sorted category indices of a formula's concepts (its domain)."""
        return tuple(sorted({int(self.category[c]) for c in concepts_of(key)}))

    def domain(self, cats: tuple[int, ...]) -> np.ndarray:
        """``(E,)`` bool: entries of the images on which every category in ``cats`` is
        annotated."""
        if cats not in self._domains:
            ok = self.entries.annotated[:, list(cats)].all(axis=1)
            self._domains[cats] = ok[self.entries.image]
        return self._domains[cats]

    def concept(self, column: int) -> np.ndarray:
        """``(E,)`` bool: entries carrying concept ``column`` (kept within a memory budget)."""
        mask = self._concepts.get(column)
        if mask is None:
            mask = self.entries.concept_mask(column)
            if (len(self._concepts) + 1) * max(1, mask.nbytes) > MASK_BUDGET:
                self._concepts.pop(next(iter(self._concepts)))
            self._concepts[column] = mask
        return mask

    def mask(self, key: Key) -> np.ndarray:
        """``(E,)`` bool: the entries on which formula ``key`` holds, within its domain."""
        m = self.concept(key[0]).copy()
        for op, c in zip(key[1::2], key[2::2], strict=True):
            if op == _AND:
                m &= self.concept(c)
            elif op == _OR:
                m |= self.concept(c)
            else:
                m &= ~self.concept(c)
        return m & self.domain(self.categories(key))

    def stats(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n_categories,)`` pixels of ``mask`` on the images annotated for each category, and
        ``(C,)`` pixels of ``mask`` carrying each concept (float64, exact)."""
        idx = np.flatnonzero(mask)
        weights = self.size[idx]
        per_image = np.bincount(self.entries.image[idx], weights=weights, minlength=self.N)
        owner, col = self.entries.labels_of(idx)
        hist = np.bincount(col, weights=weights[owner], minlength=self.C)
        return per_image @ self.ann, hist

    def concept_areas(self, cats: tuple[int, ...]) -> np.ndarray:
        """``(C,)`` pixels of each concept on the images annotated for every category in
        ``cats``."""
        if cats not in self._areas:
            self._areas[cats] = self.stats(self.domain(cats))[1]
        return self._areas[cats]


class UnitView:
    """One unit's active entries, ready for histograms.

    Parameters
    ----------
    formulas
        The run's :class:`FormulaCounts`.
    entries, counts
        The unit's active entries and its active pixels in each
        (:meth:`~.explain_counts.UnitCounts.unit`).
    """

    def __init__(self, formulas: FormulaCounts, entries: np.ndarray, counts: np.ndarray
                 ) -> None:
        self.formulas = formulas
        self.entries = entries
        self.counts = counts.astype(np.float64)
        self.owner, self.col = formulas.entries.labels_of(entries)
        self.ann = formulas.ann[formulas.entries.image[entries]]  # (nnz, n_categories)
        self._domains: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def weighted(self, inside: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Active pixels in the entries where ``inside`` (``(nnz,)`` bool; ``None``: all): per
        category (images annotated for it) and per concept."""
        w = self.counts if inside is None else self.counts * inside
        hist = np.bincount(self.col, weights=w[self.owner], minlength=self.formulas.C)
        return w @ self.ann, hist

    def domain(self, cats: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`weighted` over the domain of the categories ``cats``."""
        if cats not in self._domains:
            inside = self.formulas.domain(cats)[self.entries] if cats else None
            self._domains[cats] = self.weighted(inside)
        return self._domains[cats]


def _iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """``inter / union`` in float64, 0 where the union is empty (as :meth:`IoUTally.result`)."""
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def single_concepts(view: UnitView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU, intersection and union of the unit with every concept alone: ``(C,)`` each
    (:func:`~dissect.netdissect.dissect`'s ``I / (A[k, cat(c)] + L[c] - I)``)."""
    formulas = view.formulas
    active, inter = view.domain(())
    union = active[formulas.category] + formulas.concept_areas(()) - inter
    return _iou(inter, union), inter, union


def extensions(view: UnitView, key: Key, inside: np.ndarray,
               stats: tuple[np.ndarray, np.ndarray], operators: tuple[int, ...]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU, intersection and union of ``key op c`` for the operators ``operators`` and every
    concept ``c``: ``(len(operators), C)`` each; ``-1`` IoU where ``c`` is already in ``key``.

    Parameters
    ----------
    view
        The unit.
    key
        The formula extended.
    inside
        ``(nnz,)`` bool: whether each of the unit's active entries is in the formula.
    stats
        :meth:`FormulaCounts.stats` of the formula's mask.
    operators
        Indices into :data:`OPERATORS`.
    """
    formulas = view.formulas
    cat = formulas.category
    cats = formulas.categories(key)
    a_cat, ac = view.domain(cats)  # |A|_{F, cat}, |A c|_F
    g = formulas.concept_areas(cats)  # |c|_F
    f_cat, fc = stats  # |F|_cat, |F c|
    af_cat, afc = view.weighted(inside)  # |A F|_cat, |A F c|
    a, f, af = a_cat[cat], f_cat[cat], af_cat[cat]
    inters, sizes = [], []
    for op in operators:
        if op == _AND:
            inters.append(afc)
            sizes.append(fc)
        elif op == _OR:
            inters.append(af + ac - afc)
            sizes.append(f + g - fc)
        else:
            inters.append(af - afc)
            sizes.append(f - fc)
    inter = np.stack(inters)
    union = a[None] + np.stack(sizes) - inter
    iou = _iou(inter, union)
    iou[:, list(concepts_of(key))] = -1.0
    return iou, inter, union


def _top(iou: np.ndarray, inter: np.ndarray, union: np.ndarray, beam: int
         ) -> list[tuple[int, float, int, int]]:
    """The ``beam`` best of flat candidate arrays (``iou >= 0``), best first; ties in flat
    order. Returns ``(flat index, iou, intersection, union)``."""
    iou, inter, union = iou.reshape(-1), inter.reshape(-1), union.reshape(-1)
    order = np.lexsort((np.arange(len(iou)), -iou))
    chosen = [int(i) for i in order[:beam] if iou[i] >= 0]
    return [(i, float(iou[i]), int(round(inter[i])), int(round(union[i]))) for i in chosen]


@dataclass
class UnitSearch:
    """The state of one unit's beam search."""

    beam: list[Scored]
    fresh: list[Key]
    best_single: Scored | None


def start(view: UnitView, beam: int) -> UnitSearch:
    """Step 1: the beam holds the ``beam`` best single concepts (ties: concept-table order)."""
    iou, inter, union = single_concepts(view)
    top = [Scored((i,), v, n, u) for i, v, n, u in _top(iou, inter, union, beam)]
    return UnitSearch(top, [s.key for s in top], top[0] if top else None)


def parents(searches: list[UnitSearch]) -> dict[Key, list[int]]:
    """Every formula that entered some unit's beam in the last step, with those units."""
    out: dict[Key, list[int]] = {}
    for u, search in enumerate(searches):
        for key in search.fresh:
            out.setdefault(key, []).append(u)
    return out


def step(formulas: FormulaCounts, counts: UnitCounts, searches: list[UnitSearch], beam: int,
         operators: tuple[int, ...], tick: Callable[[], None] = lambda: None) -> None:
    """One step of every unit's beam search: every formula that entered a unit's beam in the
    last step is extended by one concept with every operator; the beam becomes the ``beam``
    best of itself and the new candidates (:meth:`Scored.order`). ``tick`` is called once per
    unit searched."""
    wanted = parents(searches)
    inside: list[dict[Key, np.ndarray]] = [{} for _ in searches]
    stats: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
    for key in sorted(wanted):  # each formula's mask once, over all the units extending it
        mask = formulas.mask(key)
        stats[key] = formulas.stats(mask)
        for u in wanted[key]:
            inside[u][key] = mask[counts.unit(u)[0]]
    for u, search in enumerate(searches):
        if not search.fresh:
            continue
        view = UnitView(formulas, *counts.unit(u))
        keys = sorted(search.fresh)
        parts = [extensions(view, key, inside[u][key], stats[key], operators) for key in keys]
        iou, inter, union = (np.stack([p[i] for p in parts]) for i in range(3))
        width = len(operators) * formulas.C
        new = []
        for flat, value, n, total in _top(iou, inter, union, beam):
            p, rest = divmod(flat, width)
            o, c = divmod(rest, formulas.C)
            new.append(Scored(keys[p] + (operators[o], c), value, n, total))
        merged = sorted(search.beam + new, key=Scored.order)[:beam]
        added = {s.key for s in new}
        search.beam = merged
        search.fresh = [s.key for s in merged if s.key in added]
        tick()
