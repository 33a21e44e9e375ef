"""The one protocol of every result object (DissectionResult, ProbeResult, TopPatches,
ActmaxResult): to_json/from_json exactly, summary, to_csv, refusals; ActmaxResult from
visualize/invert, and the report reading it."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dissect import DissectError
from dissect._plumbing.arrays import encode_array
from dissect._plumbing.paths import safe_name, unit_image_path
from dissect.ablation import AblationResult
from dissect.actmax import (
    ActmaxResult,
    channel,
    evaluate,
    invert,
    representation_distance,
    visualize,
)
from dissect.datasets import Concept
from dissect.deconvnet import Patch, ReceptiveField, TopPatches
from dissect.netdissect import DissectionResult, Explanation, ExplanationResult
from dissect.probes import LayerProbe, ProbeResult, probe
from dissect.report import write_report
from dissect.store import ActivationStore, StoreWriter, create_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _bits(t: torch.Tensor | np.ndarray) -> bytes:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a).tobytes()


def _float_eq(a: float | None, b: float | None) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


# --------------------------------------------------------------------------- the results


def make_dissection() -> DissectionResult:
    """Two layers (one with an unsafe name), two categories, known best concepts."""
    concepts = [Concept(1, "red", "color"), Concept(2, "blue", "color"),
                Concept(4, "striped", "texture"), Concept(9, "dotted", "texture")]
    iou = {
        "features.3": np.array([[0.30, 0.01, 0.02, 0.0],
                                [0.0, 0.05, 0.2, 0.1 + 0.2],  # 0.30000000000000004
                                [0.01, 0.0, 0.03, 1 / 3],
                                [0.0, 0.0, 0.0, 0.0]]),
        "c 1": np.array([[0.1, 0.2, 0.3, 0.031],
                         [0.06, 0.0, 0.01, 5e-324]]),  # the smallest subnormal
    }
    thr = {"features.3": np.array([-0.0, 1.5, np.float32(1 / 3), 3e38], dtype=np.float32),
           "c 1": np.array([1e-40, -2.0], dtype=np.float32)}
    top = {k: (np.arange(3 * len(v), dtype=np.int64).reshape(len(v), 3) * 7) % 11
           for k, v in iou.items()}
    return DissectionResult(list(iou), concepts, ["color", "texture"], iou, thr, top,
                            quantile=0.005, iou_threshold=0.04,
                            meta={"model": "tiny", "n_images": 11, "store": None})


def _row(layer: str, depth: int, **kw) -> LayerProbe:
    base = dict(layer=layer, depth=depth, train_accuracy=0.9, test_accuracy=0.75,
                test_loss=0.6931471805599453, chance=1 / 3, control_train_accuracy=0.5,
                control_test_accuracy=0.3, selectivity=0.45, flagged=False, flag_reasons=(),
                n_features=8, input_features=8, reduction=None, explained_variance=None,
                reg=1e-3, converged=True, iterations=17)
    base.update(kw)
    return LayerProbe(**base)


def make_probes() -> ProbeResult:
    rows = [
        _row("features.3", 0),
        _row("c 1", 1, control_train_accuracy=math.nan, control_test_accuracy=math.nan,
             selectivity=math.nan, flagged=True, flag_reasons=("train-test-gap",),
             n_features=4, input_features=64, reduction="pca", explained_variance=0.8125,
             converged=False),
        _row("head", 2, flagged=True, flag_reasons=("train-near-control", "train-test-gap"),
             reduction="random", n_features=2, input_features=9),
    ]
    return ProbeResult(rows, classes=np.array([0, 3, 7]), train_index=np.array([0, 2, 3, 5]),
                       test_index=np.array([1, 4]), val_index=np.array([3]),
                       settings={"pool": "mean", "reg": "auto", "seed": 0, "test_size": 0.25})


def make_top_patches() -> TopPatches:
    """Two units of "layer1.0", two patches each; the arrays hold NaN, -0.0 and subnormals."""
    g = torch.Generator().manual_seed(5)
    units, k = [6, 2], 2
    field = ReceptiveField("layer1.0", (16, 16), (8, 8), (5, 5), (2, 2), (-2, -2))
    patches = [[Patch(u, r, row=3 * n + r, index=100 + 3 * n + r, value=2.5 - r + 0.1 * n,
                      position=(r, n + 1), box=(0, 3, 1, 6), window=(-2, 3, 1, 6))
                for r in range(k)] for n, u in enumerate(units)]
    images = torch.randn(2, k, 3, 5, 5, generator=g)
    projections = torch.randn(2, k, 3, 5, 5, generator=g) * 1e-3
    images[0, 0, 0, 0, 0] = float("nan")
    images[0, 0, 0, 0, 1] = -0.0
    projections[1, 1, 2, 4, 4] = 1e-42  # subnormal float32
    projections[1, 1, 2, 4, 3] = float("-inf")
    return TopPatches("layer1.0", "guided", units, field, patches, images, projections)


def make_actmax() -> ActmaxResult:
    g = torch.Generator().manual_seed(6)
    images = torch.rand(3, 3, 6, 6, generator=g)
    images[2, 1, 0, 0] = float("nan")
    images[1, 0, 5, 5] = -0.0
    images[0, 2, 3, 3] = 1e-41
    return ActmaxResult("visualize", images, ["features.3:1", "features.3:0", "mix"],
                        [("features.3", 1), ("features.3", 0), None],
                        [0.1 + 0.2, -1.5, float("nan")],
                        {"size": 6, "steps": 3, "seed": 0, "transforms": None})


def make_ablation() -> AblationResult:
    return AblationResult("layer3", [4, 0, 9], [0, 2, 5], [3, 1, 0],
                          [0.75, 1.0, float("nan")],
                          [[0.5, 1.0, float("nan")], [0.75, 0.0, float("nan")],
                           [0.1 + 0.2, 1.0, float("nan")]],
                          metric="accuracy", mode="mean", means=[0.5, -0.0, 1e-41, 2.0],
                          settings={"samples": 4, "targets": "given"})


def make_explanations() -> ExplanationResult:
    rows = [Explanation(3, "((red AND circle) OR blue)", 0.1 + 0.2, "features.3",
                        ("red", "circle", "blue"), ("AND", "OR"), ("color", "object", "color"),
                        (3, 12, 5), 30, 100, "red", "color", 0.125, 1.5),
            Explanation(0, "c 1", 0.0, "features.3", ("c 1",), (), ("color",), (7,), 0, 0,
                        "c 1", "color", 0.0, float("inf"))]
    return ExplanationResult(rows, "features.3", {"length": 3, "beam": 5})


def assert_same_ablation(a: AblationResult, b: AblationResult) -> None:
    assert (a.layer, a.units, a.metric, a.mode, a.removal, a.settings) == \
        (b.layer, b.units, b.metric, b.mode, b.removal, b.settings)
    for name in ("classes", "counts", "baseline", "ablated", "means"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and _bits(x) == _bits(y), name


def assert_same_explanations(a: ExplanationResult, b: ExplanationResult) -> None:
    assert (a.layer, a.meta) == (b.layer, b.meta) and len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for f in fields(Explanation):
            assert _float_eq(getattr(ra, f.name), getattr(rb, f.name)), (ra.unit, f.name)


def assert_same_dissection(a: DissectionResult, b: DissectionResult) -> None:
    assert a.layers == b.layers and a.categories == b.categories
    assert a.concepts == b.concepts and all(isinstance(c, Concept) for c in b.concepts)
    assert (a.quantile, a.iou_threshold, a.meta) == (b.quantile, b.iou_threshold, b.meta)
    for layer in a.layers:
        for get in ("iou", "thresholds", "top_images"):
            x, y = getattr(a, get)(layer), getattr(b, get)(layer)
            assert x.dtype == y.dtype and x.shape == y.shape, (layer, get)
            assert _bits(x) == _bits(y), (layer, get)
        assert a.units(layer) == b.units(layer)
        assert a.detectors(layer) == b.detectors(layer)


def assert_same_probes(a: ProbeResult, b: ProbeResult) -> None:
    assert a.layers == b.layers and a.settings == b.settings
    for name in ("classes", "train_index", "test_index", "val_index"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    for ra, rb in zip(a, b, strict=True):
        for f in fields(LayerProbe):
            va, vb = getattr(ra, f.name), getattr(rb, f.name)
            assert _float_eq(va, vb), (ra.layer, f.name, va, vb)


def assert_same_top_patches(a: TopPatches, b: TopPatches) -> None:
    assert (a.layer, a.method, a.units, a.k, a.field) == (b.layer, b.method, b.units, b.k,
                                                          b.field)
    assert a.rows() == b.rows() and a.patches == b.patches
    for name in ("images", "projections"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape, name
        assert _bits(x) == _bits(y), name


def assert_same_actmax(a: ActmaxResult, b: ActmaxResult) -> None:
    assert (a.kind, a.objectives, a.units, a.settings) == (b.kind, b.objectives, b.units,
                                                           b.settings)
    assert all(u is None or type(u) is tuple for u in b.units)
    assert a.images.dtype == b.images.dtype == torch.float32
    assert a.images.shape == b.images.shape and _bits(a.images) == _bits(b.images)
    assert a.values.dtype == b.values.dtype == np.float64 and _bits(a.values) == _bits(b.values)


KINDS = {
    # kind: (class, make, default JSON name, same, names the summary must contain)
    "netdissect": (DissectionResult, make_dissection, "netdissect.json", assert_same_dissection,
                   ["features.3", "c 1"]),
    "probes": (ProbeResult, make_probes, "probes.json", assert_same_probes,
               ["features.3", "c 1", "head"]),
    "patches": (TopPatches, make_top_patches, "layer1.0_patches.json", assert_same_top_patches,
                ["layer1.0", "unit    6", "unit    2"]),
    "actmax": (ActmaxResult, make_actmax, "actmax.json", assert_same_actmax,
               ["features.3:1", "features.3:0", "mix"]),
    "ablation": (AblationResult, make_ablation, "ablation.json", assert_same_ablation,
                 ["layer3", "unit 4", "unit 9"]),
    "explanations": (ExplanationResult, make_explanations, "explanations.json",
                     assert_same_explanations, ["features.3", "((red AND circle) OR blue)"]),
}


@pytest.fixture(params=list(KINDS))
def kind(request) -> str:
    return request.param


# --------------------------------------------------------------------------- the protocol


def test_json_round_trip_is_exact(kind, tmp_path):
    cls, make, _, same, _ = KINDS[kind]
    result = make()
    path = result.to_json(tmp_path / "sub" / "r.json")
    assert path == tmp_path / "sub" / "r.json" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary left
    back = cls.from_json(path)
    assert type(back) is cls
    same(result, back)
    again = cls.from_json(back.to_json(tmp_path / "again.json"))  # and once more
    same(result, again)
    assert path.read_text() == (tmp_path / "again.json").read_text()  # a fixed point


def test_json_into_an_existing_folder_uses_the_default_name(kind, tmp_path):
    cls, make, default, same, _ = KINDS[kind]
    result = make()
    folder = tmp_path / "out"
    folder.mkdir()
    path = result.to_json(folder)
    assert path == folder / default and path.is_file()
    assert [p.name for p in folder.iterdir()] == [default]
    same(result, cls.from_json(path))
    if cls is not TopPatches:  # the others read the default name from a folder too
        same(result, cls.from_json(folder))


def test_summary_names_what_it_summarizes(kind):
    _, make, _, _, names = KINDS[kind]
    text = make().summary()
    assert isinstance(text, str) and text.strip()
    for name in names:
        assert name in text, (name, text)


def test_from_json_of_another_result_type_is_refused(kind, tmp_path):
    cls = KINDS[kind][0]
    for other, (_, make, *_) in KINDS.items():
        if other == kind:
            continue
        path = make().to_json(tmp_path / f"{other}.json")
        with pytest.raises(DissectError, match="not a torch-dissect"):
            cls.from_json(path)
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model": "x", "layers": ["a"]}))  # any other JSON
    with pytest.raises(DissectError, match="not a torch-dissect"):
        cls.from_json(run)


def test_truncated_and_damaged_files_are_refused(kind, tmp_path):
    cls, make, *_ = KINDS[kind]
    text = make().to_json(tmp_path / "good.json").read_text()
    for n, cut in enumerate((0, 1, len(text) // 3, len(text) // 2, len(text) - 1)):
        path = tmp_path / f"cut{n}.json"
        path.write_text(text[:cut])
        with pytest.raises(DissectError):
            cls.from_json(path)
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(DissectError):
        cls.from_json(tmp_path / "binary.json")
    with pytest.raises(DissectError):
        cls.from_json(tmp_path / "missing.json")
    doc = json.loads(text)
    doc["version"] = doc["version"] + 1
    (tmp_path / "newer.json").write_text(json.dumps(doc))
    with pytest.raises(DissectError, match="version"):
        cls.from_json(tmp_path / "newer.json")


REQUIRED = {
    "netdissect": ["layers", "concepts", "categories", "quantile", "iou_threshold"],
    "probes": ["layers", "classes", "train_index", "test_index"],
    "patches": ["layer", "method", "units", "receptive_field", "patches", "images",
                "projections"],
    "actmax": ["kind", "objectives", "units", "values", "images"],
    "ablation": ["layer", "units", "classes", "baseline", "ablated"],
    "explanations": ["layer", "explanations"],
}

WRONG = [None, 0, 7, -1.5, "x", "", [], [None], [1, 2], ["a"], [[1]], [{}], {}, {"a": 1},
         True]


def test_missing_keys_are_refused(kind, tmp_path):
    cls, make, *_ = KINDS[kind]
    doc = json.loads(make().to_json(tmp_path / "good.json").read_text())
    for key in REQUIRED[kind]:
        damaged = {k: v for k, v in doc.items() if k != key}
        path = tmp_path / f"no-{key}.json"
        path.write_text(json.dumps(damaged))
        with pytest.raises(DissectError, match="damaged"):
            cls.from_json(path)


def _walk(doc, prefix=()):
    """Every (path, value) of a JSON document (the arrays' base64 strings are leaves)."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _walk(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _walk(v, prefix + (i,))


def _replaced(doc, path, value):
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def test_wrong_values_raise_dissect_error_or_load(kind, tmp_path):
    """Every value of the document replaced by values of other types: from_json either loads
    or raises a DissectError, never a KeyError, TypeError, IndexError, ..."""
    cls, make, *_ = KINDS[kind]
    doc = json.loads(make().to_json(tmp_path / "good.json").read_text())
    places = [p for p, _ in _walk(doc) if p and p[0] not in ("format", "version")]
    path = tmp_path / "bad.json"
    tried = 0
    for place in places:
        for value in WRONG:
            path.write_text(json.dumps(_replaced(doc, place, value)))
            try:
                cls.from_json(path)
            except DissectError:
                pass
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{place} = {value!r}: {type(exc).__name__}: {exc}")
            tried += 1
    assert tried > 100


def test_top_patches_with_flat_arrays_are_refused(tmp_path):
    doc = json.loads(make_top_patches().to_json(tmp_path / "good.json").read_text())
    doc["images"] = encode_array(np.zeros(4, np.float32))
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DissectError, match="damaged"):
        TopPatches.from_json(tmp_path / "bad.json")


# --------------------------------------------------------------------------- CSV


def test_dissection_csv_file_and_folder_hold_the_same_rows(tmp_path):
    res = make_dissection()
    (single,) = res.to_csv(tmp_path / "all.csv")
    assert single == tmp_path / "all.csv"
    files = res.to_csv(tmp_path / "per-layer")
    assert files == [tmp_path / "per-layer" / "features.3.csv",
                     tmp_path / "per-layer" / f"{safe_name('c 1')}.csv"]
    columns = ["unit", "category", "label", "score", "color-label", "color-iou",
               "texture-label", "texture-iou"]
    header, rows = _read_csv(single)
    assert header == ["layer", *columns]
    assert len(rows) == 4 + 2  # one row per unit per layer
    assert [r[0] for r in rows] == ["features.3"] * 4 + ["c 1"] * 2
    for layer, file in zip(res.layers, files, strict=True):
        head, layer_rows = _read_csv(file)
        assert head == columns
        assert layer_rows == [r[1:] for r in rows if r[0] == layer]
    # known answers: unit 1 of features.3 is best at "dotted" (0.1 + 0.2)
    by_unit = {(r[0], int(r[1])): dict(zip(header, r, strict=True)) for r in rows}
    unit = by_unit["features.3", 1]
    assert (unit["category"], unit["label"], unit["score"]) == ("texture", "dotted", "0.300000")
    assert (unit["color-label"], unit["color-iou"]) == ("blue", "0.050000")
    assert (unit["texture-label"], unit["texture-iou"]) == ("dotted", "0.300000")
    assert by_unit["c 1", 0]["label"] == "striped"
    for (layer, u), row in by_unit.items():
        best = res.units(layer)[u]
        assert (row["label"], float(row["score"])) == (best.concept, round(best.iou, 6))


def test_dissection_csv_into_a_new_nested_file(tmp_path):
    (path,) = make_dissection().to_csv(tmp_path / "a" / "b" / "X.CSV")
    assert path.is_file() and _read_csv(path)[0][0] == "layer"


def test_dissection_csv_with_a_category_without_concepts(tmp_path):
    res = make_dissection()
    res = DissectionResult(res.layers, res.concepts, ["color", "texture", "scene"],
                           {k: res.iou(k) for k in res.layers},
                           {k: res.thresholds(k) for k in res.layers},
                           {k: res.top_images(k) for k in res.layers},
                           quantile=res.quantile, iou_threshold=res.iou_threshold)
    (path,) = res.to_csv(tmp_path / "all.csv")
    header, rows = _read_csv(path)
    assert len(rows) == 6 and "color-label" in header


def test_probe_csv(tmp_path):
    res = make_probes()
    path = res.to_csv(tmp_path / "p.csv")
    header, rows = _read_csv(path)
    assert header == [f.name for f in fields(LayerProbe)]
    assert [r[0] for r in rows] == ["features.3", "c 1", "head"]
    row = dict(zip(header, rows[1], strict=True))
    assert row["control_train_accuracy"] == "" and row["flag_reasons"] == "train-test-gap"
    assert row["reduction"] == "pca" and row["flagged"] == "True"
    assert dict(zip(header, rows[2], strict=True))["flag_reasons"] == \
        "train-near-control;train-test-gap"
    folder = tmp_path / "f"
    folder.mkdir()
    assert res.to_csv(folder) == folder / "probes.csv"


def test_top_patches_csv(tmp_path):
    res = make_top_patches()
    path = res.to_csv(tmp_path / "t.csv")
    header, rows = _read_csv(path)
    assert header[:6] == ["layer", "unit", "rank", "row", "index", "value"]
    assert len(header) == 16 and len(rows) == 2 * 2
    assert [(r[1], r[2]) for r in rows] == [("6", "0"), ("6", "1"), ("2", "0"), ("2", "1")]
    assert [float(r[5]) for r in rows] == [p.value for p in res.rows()]  # exact
    folder = tmp_path / "f"
    folder.mkdir()
    assert res.to_csv(folder) == folder / "layer1.0_patches.csv"


def test_actmax_csv(tmp_path):
    res = make_actmax()
    path = res.to_csv(tmp_path / "a.csv")
    header, rows = _read_csv(path)
    assert header == ["index", "objective", "layer", "unit", "value"]
    assert [r[:4] for r in rows] == [["0", "features.3:1", "features.3", "1"],
                                     ["1", "features.3:0", "features.3", "0"],
                                     ["2", "mix", "", ""]]
    values = [float(r[4]) for r in rows]
    assert values[:2] == [0.1 + 0.2, -1.5] and math.isnan(values[2])
    folder = tmp_path / "f"
    folder.mkdir()
    assert res.to_csv(folder) == folder / "actmax.csv"


def test_real_probe_result_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    n = 48
    y = rng.integers(0, 3, n)
    acts = {"a": rng.normal(size=(n, 4)).astype(np.float32),
            "b": (rng.normal(size=(n, 4)) + 2 * np.eye(4)[y]).astype(np.float32)}
    create_store(tmp_path / "s.h5", n=n, layers={k: v.shape[1:] for k, v in acts.items()},
                 dtype="float32", pool=None, attrs={})
    with StoreWriter(tmp_path / "s.h5") as w:
        w.write(0, np.arange(n), acts, acts)
        w.finish()
    with ActivationStore(tmp_path / "s.h5") as store:
        res = probe(store, y, progress=False)
    back = ProbeResult.from_json(res.to_json(tmp_path))
    assert_same_probes(res, back)
    assert "a" in res.summary() and "b" in res.summary()


# --------------------------------------------------------------------------- actmax results


def _upto_module_3(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """The model up to (and including) its module "3", the second convolution."""
    return torch.nn.Sequential(*list(model)[:4])


OBJECTIVES = [("3", 0), ("3", 1), channel("4", 2) - 0.5 * channel("4", 1)]
SETTINGS = {"size": 16, "steps": 3, "transforms": None, "progress": False}


def test_visualize_result(tiny, tmp_path):
    result = visualize(tiny, OBJECTIVES, return_result=True, **SETTINGS)
    plain = visualize(tiny, OBJECTIVES, **SETTINGS)
    assert isinstance(result, ActmaxResult) and result.kind == "visualize" and len(result) == 3
    assert result.images.shape == (3, 3, 16, 16) and result.images.dtype == torch.float32
    assert torch.equal(result.images, plain)  # the same seed, the same images
    assert result.units == [("3", 0), ("3", 1), None]
    assert result.objectives[:2] == ["3:0", "3:1"] and "4:2" in result.objectives[2]
    assert result.values.shape == (3,) and result.values.dtype == np.float64
    reached = evaluate(tiny, OBJECTIVES, result.images)
    np.testing.assert_allclose(result.values, reached.double().numpy(), rtol=1e-5, atol=1e-5)
    # by hand: the mean of channel 0 of module "3" on the images
    with torch.no_grad():
        maps = _upto_module_3(tiny)(result.images)
    np.testing.assert_allclose(result.values[:2], maps[:, :2].mean(dim=(2, 3)).diagonal(),
                               rtol=1e-5, atol=1e-6)
    assert result.value("3", 1) == result.values[1]
    with pytest.raises(DissectError, match="no image of 4:2"):
        result.value("4", 2)
    assert result.settings["size"] == 16 and result.settings["steps"] == 3
    written = result.save_unit_images(tmp_path / "units")
    assert sorted(written) == [("3", 0), ("3", 1)]
    files = sorted(p.relative_to(tmp_path / "units") for p in (tmp_path / "units").rglob("*")
                   if p.is_file())
    assert files == [Path("3/unit_0000.png"), Path("3/unit_0001.png")]
    for (layer, unit), path in written.items():
        assert path == unit_image_path(tmp_path / "units", layer, unit)
        expected = np.round(result.images[unit].clamp(0, 1).permute(1, 2, 0).numpy() * 255)
        np.testing.assert_array_equal(cv2.imread(str(path))[..., ::-1], expected)
    back = ActmaxResult.from_json(result.to_json(tmp_path))
    assert_same_actmax(result, back)
    assert "3:0" in result.summary() and "3 steps" in result.summary()


def test_invert_result(tiny):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    result = invert(tiny, x, "3", steps=3, return_result=True, progress=False)
    plain = invert(tiny, x, "3", steps=3, progress=False)
    assert result.kind == "invert" and result.images.shape == (2, 3, 16, 16)
    assert torch.equal(result.images, plain)
    assert result.units == [None, None] and result.objectives == ["invert 3"] * 2
    with torch.no_grad():
        target = _upto_module_3(tiny)(x)
        other = _upto_module_3(tiny)(result.images)
    by_hand = ((other - target) ** 2).flatten(1).sum(1) / (target ** 2).flatten(1).sum(1)
    np.testing.assert_allclose(result.values, by_hand.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(result.values,
                               representation_distance(target, other).double().numpy(),
                               rtol=1e-5)
    assert result.settings["layer"] == "3"
    one = invert(tiny, x[0], "3", steps=3, return_result=True, progress=False)
    assert one.images.shape == (1, 3, 16, 16)  # one (3, H, W) image: a batch of one
    assert "representation distance" in result.summary()


# --------------------------------------------------------------------------- report


def _results_folder(root: Path) -> tuple[Path, DissectionResult, ActmaxResult]:
    res = make_dissection()
    res.to_json(root / "netdissect.json")
    actmax = ActmaxResult(
        "visualize", torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(9)),
        ["features.3:1", "features.3:2", "c 1:1"],
        [("features.3", 1), ("features.3", 2), ("c 1", 1)], [2.5, 0.123456, -7.0], {})
    actmax.to_json(root / "actmax" / "x.json")
    return root, res, actmax


def _cards(page: Path) -> dict[int, str]:
    text = page.read_text()
    return {int(m.group(1)): m.group(0) for m in
            re.finditer(r'<article[^>]*data-unit="(\d+)".*?</article>', text, re.S)}


def _img(card: str) -> str:
    (src,) = re.findall(r'<img src="([^"]+)"', card)
    return src


def test_report_shows_actmax_values_and_draws_images(tmp_path):
    results, res, actmax = _results_folder(tmp_path / "results")
    index = write_report(results)
    report = index.parent
    cards = _cards(report / "layer-features.3.html")
    assert sorted(cards) == [1, 2]  # the units with an image
    assert "reaches 2.5" in cards[1] and "reaches 0.123" in cards[2]
    for unit, card in cards.items():
        src = _img(card)
        assert src == f"img/actmax/features.3/unit_{unit:04d}.png"
        drawn = cv2.imread(str(report / src))
        assert drawn is not None and drawn.shape == (8, 8, 3)
        expected = np.round(actmax.images[unit - 1].permute(1, 2, 0).numpy() * 255)
        np.testing.assert_array_equal(drawn[..., ::-1], expected)
    other = _cards(report / f"layer-{safe_name('c 1')}.html")
    assert sorted(other) == [1] and "reaches -7" in other[1]
    src = _img(other[1])
    assert src == f"img/actmax/{safe_name('c 1')}/unit_0001.png" and (report / src).is_file()
    assert not (results / "actmax" / "features.3").exists()  # nothing written into results


def test_report_copies_an_existing_actmax_png(tmp_path):
    results, _, _ = _results_folder(tmp_path / "results")
    saved = np.zeros((5, 7, 3), np.uint8)
    saved[..., 1] = 200  # green, and not the 8x8 image of the result
    src_png = unit_image_path(results / "actmax", "features.3", 1)
    src_png.parent.mkdir(parents=True)
    assert cv2.imwrite(str(src_png), saved[..., ::-1])
    report = write_report(results).parent
    cards = _cards(report / "layer-features.3.html")
    assert "reaches 2.5" in cards[1] and "reaches 0.123" in cards[2]
    copied = report / _img(cards[1])
    assert copied.read_bytes() == src_png.read_bytes()  # copied, not drawn
    assert cv2.imread(str(report / _img(cards[2]))).shape == (8, 8, 3)  # drawn
