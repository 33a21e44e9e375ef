"""Compositional explanations: planted units get their formulas, every IoU equals a dense
reference, the search equals a naive beam search over dense masks, length 1 equals dissect()."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_netdissect import TinyConcepts as Concepts

from dissect import DissectError
from dissect.datasets import Concept, SyntheticConcepts
from dissect.errors import LayerNotFoundError
from dissect.netdissect import (
    Explanation,
    ExplanationResult,
    dissect,
    explain,
    load_explanations,
    save_explanations,
)
from dissect.netdissect.explain import concept_names, formula_text
from dissect.netdissect.explain_counts import count_entries
from dissect.netdissect.explain_search import OPERATORS, FormulaCounts, UnitView, single_concepts
from dissect.netdissect.run import _thresholds
from dissect.store import ActivationStore, StoreWriter, create_store


def TinyConcepts(n: int, seg: tuple[int, int], seed: int = 0) -> Concepts:  # noqa: N802
    """Random labels in two pixel categories (color: one plane; part: two planes, unannotated
    on some images) and an image-level scene category (unannotated on some images)."""
    return Concepts(n, seg, seed, annotated=(1.0, 0.6, 0.7), color=(0.4, 0.35, 0.25),
                    part=(0.5, 0.3, 0.2))


def _store(path, acts: np.ndarray) -> ActivationStore:
    n = len(acts)
    create_store(path, n=n, layers={"conv": acts.shape[1:]}, dtype="float32", pool=None,
                 attrs={})
    with StoreWriter(path) as w:
        w.write(0, np.arange(n), {"conv": acts}, {"conv": acts.max(axis=(2, 3))})
        w.finish()
    return ActivationStore(path)


# --------------------------------------------------------------------------- dense reference


class Dense:
    """Dense per-pixel masks of a dataset: the reference every count is checked against."""

    def __init__(self, ds, acts: np.ndarray, quantile: float) -> None:
        self.ds = ds
        self.concepts = [c for c in ds.concepts if c.number != 0]
        self.cat = {c.number: ds.categories.index(c.category) for c in self.concepts}
        items = [ds[i] for i in range(len(ds))]
        seg = tuple(items[0]["pixel_labels"].shape[-2:])
        self.annotated = np.stack([it["annotated"].numpy() for it in items])
        # masks[number]: (N, sh, sw) bool, only where the concept's category is annotated
        self.masks = {}
        for c in self.concepts:
            m = np.stack([(it["pixel_labels"].numpy() == c.number).any(0)
                          | (c.number in it["image_labels"].tolist()) for it in items])
            m &= self.annotated[:, self.cat[c.number], None, None]
            self.masks[c.number] = m
        K = acts.shape[1]
        values = acts.transpose(1, 0, 2, 3).reshape(K, -1).astype(np.float64)
        self.thr = np.quantile(values, 1 - quantile, axis=1).astype(np.float32)
        up = F.interpolate(torch.from_numpy(acts).float(), size=seg, mode="bilinear",
                           align_corners=False)
        self.active = ((up > torch.from_numpy(self.thr).view(1, -1, 1, 1))
                       & torch.isfinite(up)).numpy()  # (N, K, sh, sw)

    def formula(self, numbers: tuple[int, ...], operators: tuple[str, ...]) -> np.ndarray:
        m = self.masks[numbers[0]].copy()
        for op, n in zip(operators, numbers[1:], strict=True):
            if op == "AND":
                m &= self.masks[n]
            elif op == "OR":
                m |= self.masks[n]
            else:
                m &= ~self.masks[n]
        return m

    def counts(self, unit: int, numbers: tuple[int, ...], operators: tuple[str, ...]
               ) -> tuple[int, int]:
        """Intersection and union over the images where every category is annotated."""
        domain = self.annotated[:, sorted({self.cat[n] for n in numbers})].all(1)
        m = self.formula(numbers, operators)[domain]
        a = self.active[domain, unit]
        return int((a & m).sum()), int((a | m).sum())

    def iou(self, unit: int, numbers: tuple[int, ...], operators: tuple[str, ...]) -> float:
        inter, union = self.counts(unit, numbers, operators)
        return inter / union if union else 0.0

    def beam_search(self, unit: int, length: int, beam: int, ops: tuple[str, ...]
                    ) -> tuple[tuple, float]:
        """Mu & Andreas' beam search, naively: every beam formula is extended at every step
        (including those extended before), IoUs from dense masks; ties by (-iou, length,
        key), operators in AND, OR, AND NOT order."""
        numbers = [c.number for c in self.concepts]
        op_ids = sorted(OPERATORS.index(o) for o in ops)

        def score(key):
            cols = key[0::2]
            return self.iou(unit, tuple(numbers[c] for c in cols),
                            tuple(OPERATORS[o] for o in key[1::2]))

        def order(item):
            key, value = item
            return (-value, len(key), key)

        pool = {(c,): score((c,)) for c in range(len(numbers))}
        current = sorted(pool.items(), key=order)[:beam]
        for _ in range(length - 1):
            found = dict(current)
            for key, _value in current:
                for o in op_ids:
                    for c in range(len(numbers)):
                        if c in key[0::2]:
                            continue
                        new = key + (o, c)
                        found[new] = score(new)
            current = sorted(found.items(), key=order)[:beam]
        key, value = current[0]
        names = concept_names(self.concepts)
        return formula_text(key, names), value


# --------------------------------------------------------------------------- planted units


def _planted(ds: SyntheticConcepts) -> np.ndarray:
    """Units at segmentation resolution: 1 + [red AND circle], 1 + [red OR blue],
    1 + [circle AND NOT red] (maps not resized: active pixels are exactly the indicators)."""
    number = {c.name: c.number for c in ds.concepts}
    maps = []
    for i in range(len(ds)):
        planes = ds.annotations(i)["pixel_labels"].numpy()
        red, blue = planes[0] == number["red"], planes[0] == number["blue"]
        circle = planes[1] == number["circle"]
        maps.append(np.stack([red & circle, red | blue, circle & ~red]))
    return 1.0 + np.stack(maps).astype(np.float32)


def test_planted_units_get_their_formulas(tmp_path):
    ds = SyntheticConcepts(80, size=48, seed=5)
    acts = _planted(ds)
    # tie-free: the formulas are the only ones with IoU 1 that come first in the tie order
    number = {c.name: c.number for c in ds.concepts}
    colors_of_circles = set()
    red_kinds = set()
    for i in range(len(ds)):
        planes = ds.annotations(i)["pixel_labels"].numpy()
        circle = planes[1] == number["circle"]
        colors_of_circles |= set(np.unique(planes[0][circle]).tolist())
        red_kinds |= set(np.unique(planes[1][planes[0] == number["red"]]).tolist())
    assert len(colors_of_circles - {number["red"]}) >= 2  # no single colour is circle - red
    assert number["red"] in colors_of_circles and len(red_kinds - {number["circle"]}) >= 2
    store = _store(tmp_path / "planted.h5", acts)
    res = explain(store, ds, "conv", quantile=0.5, progress=False)
    assert [e.formula for e in res] == ["(red AND circle)", "(red OR blue)",
                                        "(circle AND NOT red)"]
    assert [e.iou for e in res] == [1.0, 1.0, 1.0]
    assert all(e.intersection == e.union > 0 for e in res)
    first = res[0]
    assert first.unit == 0 and first.layer == "conv" and first.length == 2
    assert first.concepts == ("red", "circle") and first.operators == ("AND",)
    assert first.categories == ("color", "object") and first.category_set == {"color", "object"}
    assert first.numbers == (number["red"], number["circle"])
    assert first.best_iou < 1.0 and first.gain == 1.0 - first.best_iou
    assert first.threshold == 1.0
    # the single best concepts are dissect()'s labels, with its IoUs
    d = dissect(store, ds, quantile=0.5, progress=False)
    assert [(e.best_concept, e.best_iou) for e in res] == [
        (u.concept, u.iou) for u in d.units("conv")]
    # beam 1 extends only the best single concept: the same masks, written from it
    narrow = explain(store, ds, "conv", quantile=0.5, progress=False, beam=1)
    assert [e.iou for e in narrow][:2] == [1.0, 1.0]
    assert narrow[1].formula == f"({res[1].best_concept} OR " \
        f"{({'red', 'blue'} - {res[1].best_concept}).pop()})"
    # ... and without AND NOT the third cannot be written exactly
    no_not = explain(store, ds, "conv", [2], quantile=0.5, progress=False,
                     operators=("AND", "OR"))
    assert no_not[0].iou < 1.0 and "NOT" not in no_not[0].formula


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["tiny", "synthetic"])
def test_every_formula_equals_the_dense_reference_and_the_naive_search(tmp_path, kind):
    if kind == "tiny":
        ds = TinyConcepts(30, (9, 7), seed=1)
        acts = np.random.default_rng(3).standard_normal((30, 5, 3, 4)).astype(np.float32)
        q = 0.05
    else:
        ds = SyntheticConcepts(24, size=32, seed=2)
        acts = np.random.default_rng(4).standard_normal((24, 4, 5, 5)).astype(np.float32)
        q = 0.02
    dense = Dense(ds, acts, q)
    store = _store(tmp_path / "s.h5", acts)
    res = explain(store, ds, "conv", quantile=q, length=3, beam=3, progress=False,
                  batch_size=7)
    assert len(res) == acts.shape[1]
    np.testing.assert_array_equal([e.threshold for e in res], dense.thr)
    for e in res:
        inter, union = dense.counts(e.unit, e.numbers, e.operators)
        assert (e.intersection, e.union) == (inter, union)
        assert e.iou == inter / union
        assert (e.formula, e.iou) == dense.beam_search(e.unit, 3, 3, OPERATORS)
        assert e.iou >= e.best_iou


def test_candidate_counts_equal_dense_masks(tmp_path):
    """Every extension of every formula (not only the winners) against dense masks."""
    ds = TinyConcepts(20, (6, 6), seed=4)
    acts = np.random.default_rng(5).standard_normal((20, 3, 3, 3)).astype(np.float32)
    dense = Dense(ds, acts, 0.1)
    store = _store(tmp_path / "s.h5", acts)
    entries, counts, concepts = _counted(store, ds, 0.1)
    from dissect.netdissect.explain_search import extensions

    formulas = FormulaCounts(entries, _categories(ds, concepts))
    numbers = [c.number for c in concepts]
    for unit in range(3):
        view = UnitView(formulas, *counts.unit(unit))
        for key in [(0,), (2,), (4,), (1, 1, 3), (2, 2, 5), (4, 0, 0)]:
            mask = formulas.mask(key)
            iou, inter, union = extensions(view, key, mask[view.entries], formulas.stats(mask),
                                           (0, 1, 2))
            for o in range(3):
                for c in range(len(numbers)):
                    if c in key[0::2]:
                        assert iou[o, c] == -1.0
                        continue
                    full = key + (o, c)
                    nums = tuple(numbers[j] for j in full[0::2])
                    ops = tuple(OPERATORS[j] for j in full[1::2])
                    want = dense.counts(unit, nums, ops)
                    assert (inter[o, c], union[o, c]) == want, (unit, full)


def _categories(ds, concepts):
    return np.array([ds.categories.index(c.category) for c in concepts], dtype=np.int64)


def _counted(store, ds, q, engine="numba"):
    concepts = [c for c in ds.concepts if c.number != 0]
    thr, _ = _thresholds(store, ["conv"], range(len(store)), q, torch.device("cpu"), None)
    K = store["conv"].shape[1]
    entries, counts = count_entries(
        store, "conv", list(range(K)), thr["conv"], ds,
        np.array([c.number for c in concepts]), _categories(ds, concepts),
        len(ds.categories), batch_size=8, device=torch.device("cpu"), engine=engine,
        num_workers=0, annotation_cache=False, progress=False)
    return entries, counts, concepts


@pytest.mark.parametrize("kind", ["tiny", "synthetic"])
def test_single_concepts_equal_dissect(tmp_path, kind):
    if kind == "tiny":
        ds = TinyConcepts(25, (8, 8), seed=7)
        acts = np.random.default_rng(8).standard_normal((25, 6, 3, 3)).astype(np.float32)
    else:
        ds = SyntheticConcepts(30, size=32, seed=9)
        acts = np.random.default_rng(9).standard_normal((30, 6, 4, 4)).astype(np.float32)
    store = _store(tmp_path / "s.h5", acts)
    d = dissect(store, ds, quantile=0.05, progress=False)
    entries, counts, concepts = _counted(store, ds, 0.05)
    formulas = FormulaCounts(entries, _categories(ds, concepts))
    got = np.stack([single_concepts(UnitView(formulas, *counts.unit(u)))[0] for u in range(6)])
    np.testing.assert_array_equal(got, d.iou("conv"))  # every unit and concept, bit for bit
    one = explain(store, ds, "conv", length=1, quantile=0.05, progress=False)
    assert [(e.formula, e.iou) for e in one] == [(u.concept, u.iou) for u in d.units("conv")]
    assert all(e.length == 1 and e.operators == () for e in one)
    # a category subset: dissect(categories=...) labels
    d_col = dissect(store, ds, quantile=0.05, progress=False, categories=["color"])
    col = explain(store, ds, "conv", length=1, quantile=0.05, progress=False,
                  categories=["color"])
    assert [(e.formula, e.iou) for e in col] == [(u.concept, u.iou)
                                                for u in d_col.units("conv")]


def test_engines_count_the_same(tmp_path):
    ds = SyntheticConcepts(12, size=32, seed=1)
    acts = np.random.default_rng(1).standard_normal((12, 8, 4, 4)).astype(np.float32)
    store = _store(tmp_path / "s.h5", acts)
    a = _counted(store, ds, 0.05, "numba")[1]
    b = _counted(store, ds, 0.05, "torch")[1]
    for x, y in zip((a.ptr, a.entry, a.count), (b.ptr, b.entry, b.count), strict=True):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- arguments


def test_arguments(tmp_path):
    ds = TinyConcepts(20, (6, 6), seed=2)
    acts = np.random.default_rng(2).standard_normal((20, 5, 3, 3)).astype(np.float32)
    store = _store(tmp_path / "s.h5", acts)
    full = explain(store, ds, "conv", quantile=0.1, progress=False)
    some = explain(store, ds, "conv", [3, 1, 3], quantile=0.1, progress=False)
    assert [e.unit for e in some] == [3, 1]
    assert some[0] == full[3] and some[1] == full[1]  # a unit's answer does not depend on others
    assert explain(store, ds, "conv", 4, quantile=0.1, progress=False)[0] == full[4]
    only_and = explain(store, ds, "conv", quantile=0.1, progress=False, operators=["and"])
    assert all(set(e.operators) <= {"AND"} for e in only_and)
    short = explain(store, ds, "conv", quantile=0.1, progress=False, length=2)
    assert all(e.length <= 2 for e in short)
    assert all(s.iou <= f.iou for s, f in zip(short, full, strict=True))
    colors = explain(store, ds, "conv", quantile=0.1, progress=False, categories=["color"])
    assert all(set(e.categories) == {"color"} for e in colors)
    assert all(e.length <= 2 for e in colors)  # two color concepts: nothing else to add
    assert full.meta["length"] == 3 and full.meta["beam"] == 5
    assert full.meta["operators"] == ["AND", "OR", "AND NOT"]
    assert full.layer == "conv" and full.unit(2) == full[2]
    wide = explain(store, ds, "conv", quantile=0.1, progress=False, beam=50)
    assert all(w.iou >= f.iou for w, f in zip(wide, full, strict=True))


def test_errors(tmp_path):
    ds = TinyConcepts(10, (6, 6))
    acts = np.random.default_rng(0).standard_normal((10, 3, 3, 3)).astype(np.float32)
    store = _store(tmp_path / "s.h5", acts)
    with pytest.raises(DissectError, match="unknown operator"):
        explain(store, ds, "conv", operators=("AND", "XOR"), progress=False)
    with pytest.raises(DissectError, match="no operators"):
        explain(store, ds, "conv", operators=(), progress=False)
    with pytest.raises(DissectError, match="length"):
        explain(store, ds, "conv", length=0, progress=False)
    with pytest.raises(DissectError, match="beam"):
        explain(store, ds, "conv", beam=0, progress=False)
    with pytest.raises(LayerNotFoundError, match="conv"):
        explain(store, ds, "conf", progress=False)
    with pytest.raises(DissectError, match="quantile"):
        explain(store, ds, "conv", quantile=1.5, progress=False)
    with pytest.raises(DissectError, match="out of range"):
        explain(store, ds, "conv", [3], progress=False)
    with pytest.raises(DissectError, match="unknown categories"):
        explain(store, ds, "conv", categories=["texture"], progress=False)
    with pytest.raises(DissectError, match="beyond the dataset"):
        explain(store, TinyConcepts(6, (6, 6)), "conv", progress=False)
    with pytest.raises(DissectError, match="ConceptDataset"):
        explain(store, list(range(10)), "conv", progress=False)
    with pytest.raises(DissectError, match="ActivationStore"):
        explain(str(store.path), ds, "conv", progress=False)
    flat = tmp_path / "flat.h5"
    create_store(flat, n=10, layers={"fc": (3,)}, dtype="float32", pool=None, attrs={})
    with StoreWriter(flat) as w:
        a = acts.max(axis=(2, 3))
        w.write(0, np.arange(10), {"fc": a}, {"fc": a})
        w.finish()
    with pytest.raises(DissectError, match="spatial maps"):
        explain(ActivationStore(flat), ds, "fc", progress=False)


def test_dead_units_and_ties(tmp_path):
    """A unit never active gets the first concept with IoU 0; a unit equal to two concepts'
    union is written in concept-table order."""
    ds = TinyConcepts(12, (4, 4), seed=3)
    acts = np.zeros((12, 2, 4, 4), dtype=np.float32)
    red_or_blue = np.stack([np.isin(ds.pixel[i, 0], [1, 2]) for i in range(12)])
    acts[:, 1] = 1 + red_or_blue
    store = _store(tmp_path / "s.h5", acts)
    res = explain(store, ds, "conv", quantile=0.7, progress=False)  # T = 0 and T = 1
    assert (res[0].formula, res[0].iou, res[0].intersection) == ("red", 0.0, 0)
    assert (res[1].formula, res[1].iou) == ("(red OR blue)", 1.0)


def test_names_and_text():
    concepts = [Concept(1, "wood", "material"), Concept(2, "wood", "texture"),
                Concept(3, "red", "color"), Concept(4, "red", "color")]
    names = concept_names(concepts)
    assert names == ["material:wood", "texture:wood", "color:red#3", "color:red#4"]
    assert formula_text((2,), names) == "color:red#3"
    assert formula_text((0, 0, 2, 2, 1), names) == \
        "((material:wood AND color:red#3) AND NOT texture:wood)"
    assert formula_text((0, 1, 1), ["a", "b"]) == "(a OR b)"


# --------------------------------------------------------------------------- files


def _other(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "torch-dissect-netdissect", "version": 1}))
    return path


def test_files(tmp_path):
    ds = TinyConcepts(15, (6, 6), seed=6)
    acts = np.random.default_rng(6).standard_normal((15, 3, 3, 3)).astype(np.float32)
    acts[:, 2] = np.nan  # a unit without a finite value: threshold inf, never active
    store = _store(tmp_path / "s.h5", acts)
    res = explain(store, ds, "conv", quantile=0.1, progress=False)
    assert isinstance(res, list) and isinstance(res, ExplanationResult)
    assert math.isinf(res[2].threshold) and res[2].iou == 0.0
    assert res.meta["nonfinite"] == 15 * 9
    path = res.to_json(tmp_path)
    assert path.name == "explanations.json"
    again = ExplanationResult.from_json(path)
    assert list(again) == list(res) and again.layer == "conv" and again.meta == res.meta
    doc = json.loads(path.read_text())
    assert doc["format"] == "torch-dissect-explanations" and doc["version"] == 1
    assert doc["explanations"][0]["formula"] == res[0].formula
    plain = save_explanations(list(res), tmp_path / "plain.json")
    loaded = load_explanations(plain)
    assert list(loaded) == list(res) and loaded.layer == "conv"
    csv_path = res.to_csv(tmp_path / "e.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("layer,unit,formula,iou") and len(lines) == 4
    text = res.summary()
    assert "conv" in text and res[0].formula in text
    (tmp_path / "bad.json").write_text(json.dumps({"format": "torch-dissect-explanations",
                                                   "version": 1, "explanations": [{"x": 1}]}))
    with pytest.raises(DissectError, match="damaged"):
        load_explanations(tmp_path / "bad.json")
    with pytest.raises(DissectError, match="cannot read a compositional explanation"):
        load_explanations(csv_path)
    with pytest.raises(DissectError, match="not a torch-dissect compositional"):
        load_explanations(_other(tmp_path))
    row = Explanation(0, "red", 0.5)
    assert row.length == 0 and row.formula == "red"
    with pytest.raises(DissectError, match="Explanation rows"):
        ExplanationResult([1, 2])


def test_labels_of_unannotated_categories_are_left_out_with_a_warning(tmp_path, caplog):
    ds = TinyConcepts(12, (6, 6), seed=8)
    off = np.flatnonzero(~ds.annotated[:, 1])
    assert len(off)
    ds.pixel[off, 1] = 3  # "edge" labels on images whose part category is not annotated
    acts = np.random.default_rng(8).standard_normal((12, 2, 3, 3)).astype(np.float32)
    dense = Dense(ds, acts, 0.1)  # the reference drops them too
    store = _store(tmp_path / "s.h5", acts)
    with caplog.at_level("WARNING", logger="dissect.netdissect.explain"):
        res = explain(store, ds, "conv", quantile=0.1, progress=False)
    assert "left out" in caplog.text and "edge" in caplog.text
    for e in res:
        assert (e.intersection, e.union) == dense.counts(e.unit, e.numbers, e.operators)
