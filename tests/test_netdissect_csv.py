"""Published Network Dissection results: NetDissect(-Lite) CSVs read into a DissectionResult,
and two results compared unit by unit (known answers, counted by hand below)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dissect.datasets.concepts import Concept
from dissect.errors import DataError, DissectError
from dissect.netdissect.published import compare_results, layer_from_file, read_netdissect_csv
from dissect.netdissect.result import DissectionResult

# NetDissect-Lite's tally CSV (feature_operation.py, FeatureOperator.tally): csv.DictWriter with
# the header unit, category, label, score, then per category label/truth/activation/intersect/
# iou; units from 1; rows sorted by score, best first; every count a float64 ("1000.0"); IoUs
# str() of float64 = intersect / (activation + truth - intersect + 1e-10); "\r\n" line ends. A
# category whose best IoU is 0 names argmax's pick, label 0 ("-"); a dead unit's category is
# the last one (argsort of equal scores, reversed).
LITE = """\
unit,category,label,score,object-label,object-truth,object-activation,object-intersect,object-iou,texture-label,texture-truth,texture-activation,texture-intersect,texture-iou,color-label,color-truth,color-activation,color-intersect,color-iou
6,object,car,0.3000520020800754,car,4000.0,1000.0,1154.0,0.3000520020800754,striped,3000.0,1000.0,172.0,0.04493207941483686,blue,7000.0,1000.0,157.0,0.020017850312380212
1,object,dog,0.24999999999999478,dog,5000.0,1000.0,1200.0,0.24999999999999478,striped,3000.0,1000.0,190.0,0.04986876640419816,red,6000.0,1000.0,137.0,0.0199621156928454
2,texture,dotted,0.10011001100109644,car,4000.0,1000.0,146.0,0.03007828594973156,dotted,2000.0,1000.0,273.0,0.10011001100109644,blue,7000.0,1000.0,453.0,0.06002385053663628
3,object,dog,0.07991360691144564,dog,5000.0,1000.0,444.0,0.07991360691144564,striped,3000.0,1000.0,40.0,0.010101010101009845,-,0.0,1000.0,0.0,0.0
4,color,red,0.03504361969540093,car,4000.0,1000.0,98.0,0.01999184006527907,dotted,2000.0,1000.0,87.0,0.02986611740473636,red,6000.0,1000.0,237.0,0.03504361969540093
5,color,-,0.0,-,0.0,1000.0,0.0,0.0,-,0.0,1000.0,0.0,0.0,-,0.0,1000.0,0.0,0.0
""".replace("\n", "\r\n")
# By hand, units from 0 (IoU > 0.04 is a detector):
#   unit 0: dog .250 (object), striped .050, red .020      detector
#   unit 1: dotted .100 (texture), car .030, blue .060     detector
#   unit 2: dog .080 (object), striped .010, color 0       detector
#   unit 3: red .035 (color), car .020, dotted .030        -
#   unit 4: everything 0 (no best concept)                 -
#   unit 5: car .300 (object), striped .045, blue .020     detector
# detectors 4; unique top concepts {dog, dotted, car} = 3; per category (NetDissect's plots):
# object {dog, car} 2 + texture {striped (units 0, 5), dotted} 2 + color {blue} 1 = 5.

CONCEPTS = [Concept(1, "dog", "object"), Concept(2, "car", "object"),
            Concept(3, "striped", "texture"), Concept(4, "dotted", "texture"),
            Concept(5, "red", "color"), Concept(6, "blue", "color")]
OURS = np.array([  # dog car striped dotted red blue
    [.20, .01, .06, .00, .00, .02],   # dog: same top as Lite; detector
    [.00, .02, .07, .05, .01, .045],  # striped, Lite dotted; detector
    [.03, .00, .00, .01, .02, .00],   # dog: same top; not a detector here
    [.01, .02, .00, .00, .05, .03],   # red: same top; detector here only
    [.00, .01, .00, .00, .00, .00],   # car; Lite's unit 4 has no best concept
    [.10, .50, .00, .00, .00, .00],   # car: same top; detector
])
# ours: detectors 0, 1, 3, 5; unique {dog, striped, red, car} = 4; per category: object
# {dog, car} 2 + texture {striped} 1 + color {blue (unit 1), red (unit 3)} 2 = 5.
# Both: same top 0, 2, 3, 5 = 4; detectors on both sides 0, 1, 5 = 3, of which same top 0, 5.


def ours(layers=("layer4",), matrix=OURS) -> DissectionResult:
    k = matrix.shape[0]
    return DissectionResult(
        list(layers), CONCEPTS, ["object", "texture", "color"],
        {name: matrix.copy() for name in layers},
        {name: np.linspace(1, 2, k).astype(np.float32) for name in layers},
        {name: np.zeros((k, 3), dtype=np.int64) for name in layers},
        quantile=0.005, iou_threshold=0.04)


@pytest.fixture
def lite(tmp_path):
    path = tmp_path / "tally_layer4.csv"
    path.write_bytes(LITE.encode())
    return path


def write(tmp_path, text, name="tally_layer4.csv"):
    path = tmp_path / name
    path.write_bytes(text.replace("\r\n", "\n").replace("\n", "\r\n").encode())
    return path


def lines_of(text=LITE):
    return text.replace("\r\n", "\n").splitlines()


def test_reads_lite_format(lite):
    r = DissectionResult.from_netdissect_csv(lite)
    assert r.layers == ["layer4"] and r.categories == ["object", "texture", "color"]
    assert r.meta == {"source": "netdissect-csv", "files": [str(lite)],
                      "first_unit": {"layer4": 1}}
    # "-" (argmax's pick where a category's best IoU is 0) makes no concept
    assert [(c.name, c.category) for c in r.concepts] == [
        ("car", "object"), ("dog", "object"), ("striped", "texture"), ("dotted", "texture"),
        ("blue", "color"), ("red", "color")]
    units = r.units("layer4")
    assert [(u.unit, u.concept, u.category) for u in units[:4]] == [
        (0, "dog", "object"), (1, "dotted", "texture"), (2, "dog", "object"), (3, "red", "color")]
    assert units[4].iou == 0 and not units[4].is_detector
    assert [round(u.iou, 3) for u in units] == [.25, .1, .08, .035, 0, .3]
    assert [u.unit for u in r.detectors("layer4")] == [5, 0, 1, 2]
    tex = r.units("layer4", "texture")
    assert [(u.concept, round(u.iou, 3)) for u in tex] == [
        ("striped", .05), ("dotted", .1), ("striped", .01), ("dotted", .03), ("striped", 0),
        ("striped", .045)]  # unit 4: every texture IoU is 0, the first concept is taken
    iou = r.iou("layer4")
    # only the per-category bests are known: unit 0's car IoU is unknown, not 0
    assert math.isnan(iou[0, 0]) and iou[0, 1] == pytest.approx(0.25)
    # a category whose best IoU is 0 is 0 for every concept of it
    assert iou[2, 4] == 0 and iou[2, 5] == 0 and (iou[4] == 0).all()
    assert np.isnan(r.thresholds("layer4")).all() and r.top_images("layer4").shape == (6, 0)
    assert "layer4" in r.summary() and " 4 " in r.summary()


def test_comparison_counts_by_hand(lite):
    c = compare_results(ours(), lite)
    (row,) = c.rows
    assert (row.layer_a, row.layer_b, row.units) == ("layer4", "layer4", 6)
    assert (row.same_top, row.detectors_both, row.same_top_detectors) == (4, 3, 2)
    assert (row.detectors_a, row.detectors_b) == (4, 4)
    assert (row.unique_a, row.unique_b) == (4, 3)
    assert (row.unique_per_category_a, row.unique_per_category_b) == (5, 5)
    # symmetric
    (back,) = compare_results(lite, ours()).rows
    assert (back.same_top, back.unique_a, back.unique_b) == (4, 3, 4)
    table = c.summary()
    assert "same top" in table and str(lite) in table
    assert table.splitlines()[3].split() == ["layer4", "6", "4", "4", "4", "3", "2", "4", "3",
                                             "5", "5"]


def test_comparison_files(lite, tmp_path):
    c = compare_results(ours(), lite)
    doc = json.loads(c.to_json(tmp_path / "c.json").read_text())
    assert doc["format"] == "torch-dissect-comparison" and doc["rows"][0]["same_top"] == 4
    text = c.to_csv(tmp_path / "c.csv").read_text().splitlines()
    assert text[0].startswith("layer_a,layer_b,units,same_top,")
    assert text[1] == "layer4,layer4,6,4,4,4,3,2,4,3,5,5"


def test_unique_per_category_counts_names_per_category(tmp_path):
    # a unit above the threshold in two categories counts in both; a name in two categories
    # counts twice (the paper's plots sum the per-category counts)
    concepts = [Concept(1, "grass", "object"), Concept(2, "grass", "texture")]
    m = np.array([[.3, .2], [.1, .01]])
    r = DissectionResult(["l"], concepts, ["object", "texture"], {"l": m},
                         {"l": np.zeros(2, np.float32)}, {"l": np.zeros((2, 0), np.int64)},
                         quantile=.005, iou_threshold=.04)
    (row,) = compare_results(r, r).rows
    assert (row.detectors_a, row.unique_a, row.unique_per_category_a) == (2, 1, 2)
    assert (row.same_top, row.same_top_detectors) == (2, 2)


@pytest.mark.parametrize("layer_column", [False, True])
def test_round_trip_to_csv(tmp_path, layer_column):
    rng = np.random.default_rng(0)
    result = ours(("features.3", "layer4"), rng.uniform(0, 0.3, (9, 6)))
    result._iou["layer4"] = rng.uniform(0, 0.3, (9, 6))
    target = tmp_path / ("all.csv" if layer_column else "csvs")
    result.to_csv(target)
    back = DissectionResult.from_netdissect_csv(target)
    assert back.layers == result.layers
    assert back.meta["first_unit"] == {"features.3": 0, "layer4": 0}
    for layer in result.layers:
        for cat in (None, "object", "texture", "color"):
            want, got = result.units(layer, cat), back.units(layer, cat)
            assert [(u.unit, u.concept, u.category) for u in got] == \
                [(u.unit, u.concept, u.category) for u in want]
            np.testing.assert_allclose([u.iou for u in got], [u.iou for u in want], atol=5e-7)
    # ... and again through the reader's own result (NaN cells written as empty cells)
    again = DissectionResult.from_netdissect_csv(back.to_csv(tmp_path / "again"))
    assert [u.concept for u in again.units("layer4")] == \
        [u.concept for u in result.units("layer4")]


def test_unit_numbering(tmp_path, lite):
    # ours from 0: read from 0
    rows = ["unit,category,label,score,object-label,object-iou",
            "0,object,dog,0.100000,dog,0.100000", "1,object,car,0.200000,car,0.200000"]
    r = read_netdissect_csv(write(tmp_path, "\n".join(rows) + "\n", "mine.csv"))
    assert r.layers == ["mine"] and r.meta["first_unit"] == {"mine": 0}
    assert [u.concept for u in r.units("mine")] == ["dog", "car"]
    # ours from 1 is ambiguous (unit 0 missing, or numbered from 1): refused, then explicit
    one = "\n".join([rows[0], rows[1].replace("0,", "2,", 1), rows[2]]) + "\n"
    path = write(tmp_path, one, "mine.csv")
    with pytest.raises(DataError, match=r"mine.csv: the units of layer 'mine' are numbered 1 "
                                        r"to 2 .* first_unit=0 or first_unit=1"):
        read_netdissect_csv(path)
    assert [u.concept for u in read_netdissect_csv(path, first_unit=1).units("mine")] == \
        ["car", "dog"]
    with pytest.raises(DataError, match=r"numbered from 0, layer 'mine' has 2 units but lacks "
                                        r"units \[0\]"):
        read_netdissect_csv(path, first_unit=0)
    # Lite from 1; Lite with a unit left out: a gap
    gap = "\n".join(line for line in lines_of() if not line.startswith("3,")) + "\n"
    with pytest.raises(DataError, match=r"the 5 units of layer 'layer4' are numbered 1 to 6, "
                                        r"without \[3\]"):
        read_netdissect_csv(write(tmp_path, gap))
    with pytest.raises(DissectError, match="first_unit is 2"):
        read_netdissect_csv(lite, first_unit=2)


def test_layer_names(tmp_path, lite):
    assert layer_from_file(lite) == "layer4"
    from pathlib import Path
    assert layer_from_file(Path("conv5-result.csv")) == "conv5"
    assert layer_from_file(Path("tally.csv")) == "tally"
    assert layer_from_file(Path("features.13.csv")) == "features.13"
    r = read_netdissect_csv({"block4": lite})
    assert r.layers == ["block4"]
    with pytest.raises(DataError, match="layer 'layer4' is in both"):
        read_netdissect_csv([lite, lite])


def test_report_renders_imported_result(lite, tmp_path):
    from dissect.report import write_report

    folder = tmp_path / "results"
    folder.mkdir()
    read_netdissect_csv(lite).to_json(folder)
    index = write_report(folder)
    page = (index.parent / "layer-layer4.html").read_text()
    assert page.count('class="card') == 6 and "dotted" in page
    assert "<img src=\"img/" not in page and "threshold nan" not in page
    assert "read from NetDissect result CSVs" in page


def drop_column(text: str, name: str) -> str:
    rows = [line.split(",") for line in lines_of(text)]
    at = rows[0].index(name)
    return "".join(",".join(r[:at] + r[at + 1:]) + "\r\n" for r in rows)


BAD = [
    (lambda t: drop_column(t, "object-iou"), r"tally_layer4.csv line 1: header .* lacks "
     r"the columns \['object-iou'\]"),
    (lambda t: t.replace("0.3000520020800754,car", "abc,car", 1),
     r"tally_layer4.csv line 2: malformed row: column 'score' is 'abc'"),
    (lambda t: t.replace("0.24999999999999478,striped", "nan,striped", 1),
     r"line 3: malformed row: column 'object-iou' is 'nan'"),
    (lambda t: t.replace(",0.06002385053663628", ",-0.06", 1),
     r"line 4: column 'color-iou' is '-0.06': an IoU is a number from 0 to 1"),
    (lambda t: t.replace("\r\n1,object", "\r\n6,object", 1),
     r"line 3: unit 6 of layer 'layer4' again \(first on line 2\)"),
    (lambda t: t.replace("4,color,red,0.03504361969540093", "4,color,red,0.04", 1),
     r"line 6: label 'red' with score 0.04 disagrees with color-label 'red' with color-iou "
     r"0.0350436"),
    (lambda t: t.replace("4,color,red", "4,color,blue", 1), r"line 6: label 'blue'"),
    (lambda t: t.replace("4,color,red,0.03504361969540093", "4,texture,dotted,0.02986611740473636",
                         1), r"line 6: score 0.0298661 is below the unit's best IoU 0.0350436"),
    (lambda t: t.replace("3,object,dog", "3,scene,dog", 1),
     r"line 5: category 'scene' is not one of the file's categories"),
    (lambda t: t.split("\r\n")[0] + "\r\n", r"has a header but no units"),
    (lambda t: "", r"is empty"),
]


@pytest.mark.parametrize("edit, message", BAD)
def test_errors_name_file_and_line(tmp_path, edit, message):
    path = tmp_path / "tally_layer4.csv"
    path.write_bytes(edit(LITE).encode())
    with pytest.raises(DataError, match=message):
        read_netdissect_csv(path)


def test_comparison_errors(lite, tmp_path):
    with pytest.raises(DissectError, match=r"layer 'layer4' of A has 5 units but layer 'layer4' "
                                           r"of B has 6"):
        compare_results(ours(matrix=OURS[:5]), lite)
    with pytest.raises(DissectError, match=r"share no layer: A has \['conv5'\], B has "
                                           r"\['layer4'\]; .*layers="):
        compare_results(ours(("conv5",)), lite)
    (row,) = compare_results(ours(("conv5",)), lite, layers={"conv5": "layer4"}).rows
    assert (row.layer_a, row.layer_b, row.same_top) == ("conv5", "layer4", 4)
    with pytest.raises(DissectError, match=r"B has no layer \['fc'\]; its layers are"):
        compare_results(ours(), lite, layers={"layer4": "fc"})
    with pytest.raises(DataError, match="does not exist"):
        compare_results(ours(), tmp_path / "nothing")


def test_nan_safe_units():
    m = np.array([[np.nan, .2, np.nan], [np.nan, np.nan, np.nan]])
    r = DissectionResult(["l"], CONCEPTS[:3], ["object", "texture"], {"l": m},
                         {"l": np.zeros(2, np.float32)}, {"l": np.zeros((2, 0), np.int64)},
                         quantile=.005, iou_threshold=.04)
    a, b = r.units("l")
    assert (a.concept, a.iou, a.is_detector) == ("car", .2, True)
    assert (b.concept, b.category, b.is_detector) == ("", "object", False) and math.isnan(b.iou)
    (t, _) = r.units("l", "texture")
    assert t.concept == "" and t.category == "texture" and math.isnan(t.iou)


def test_a_best_iou_without_its_label_is_unknown_with_a_warning(tmp_path, caplog):
    # NetDissect's own published ResNet-152 CSVs (plot/ of CSAILVision/NetDissect) leave the
    # texture label empty on hundreds of rows while giving its counts and IoU; such a cell is
    # unknown (NaN), never a concept named "", and a warning counts the rows
    text = LITE.replace(",striped,3000.0,1000.0,190.0,0.04986876640419816,",
                        ",,3000.0,1000.0,190.0,0.04986876640419816,", 1)
    assert text != LITE
    path = write(tmp_path, text)
    with caplog.at_level("WARNING", logger="dissect.netdissect.published"):
        result = read_netdissect_csv(path)
    assert "1 rows (first on line 3) give a category's best IoU without its label" in caplog.text
    row = [c.name for c in result.concepts].index("striped")
    iou = result.iou("layer4")
    assert math.isnan(iou[0, row]) and iou[5, row] == pytest.approx(0.04493207941483686)
    assert "" not in [c.name for c in result.concepts]
    assert [u.concept for u in result.units("layer4", "texture")][:2] == ["", "dotted"]
    assert result.units("layer4")[0].concept == "dog"  # the unit's best named concept
    # its counts are still checked
    caplog.clear()
    bad = text.replace(",,3000.0,1000.0,190.0,", ",,3000.0,1000.0,191.0,", 1)
    with caplog.at_level("WARNING", logger="dissect.netdissect.published"):
        read_netdissect_csv(write(tmp_path, bad))
    assert "on 1 rows (first on line 3) a category's -intersect" in caplog.text


def test_counts_that_disagree_with_the_iou_are_warned_about_and_the_iou_read(tmp_path,
                                                                              caplog):
    # the counts are not used, so a file whose counts were edited is read (its IoUs as they
    # are) with a loud warning naming the first line, not refused
    text = LITE.replace("146.0,0.03007828594973156", "147.0,0.03007828594973156", 1)
    with caplog.at_level("WARNING", logger="dissect.netdissect.published"):
        result = read_netdissect_csv(write(tmp_path, text))
    assert "on 1 rows (first on line 4) a category's -intersect / (-activation + -truth - " \
           "-intersect) is not its -iou" in caplog.text
    car = [c.name for c in result.concepts].index("car")
    assert result.iou("layer4")[1, car] == pytest.approx(0.03007828594973156)


def test_only_the_four_top_columns(tmp_path):
    # unit, category, label, score: each unit's best concept is all that is known
    text = ("unit,category,label,score\n1,object,dog,0.25\n2,texture,dotted,0.1\n"
            "3,object,dog,0.03\n")
    result = read_netdissect_csv(write(tmp_path, text))
    assert result.categories == ["object", "texture"]
    assert [(u.unit, u.concept, u.category, u.iou, u.is_detector)
            for u in result.units("layer4")] == [
        (0, "dog", "object", 0.25, True), (1, "dotted", "texture", 0.1, True),
        (2, "dog", "object", 0.03, False)]
    assert result.meta["first_unit"] == {"layer4": 1}  # NetDissect's numbering
    iou = result.iou("layer4")
    assert np.isnan(iou).sum() == 3  # one known cell per unit, two concepts
    row = compare_results(result, result).rows[0]
    assert (row.detectors_a, row.unique_a, row.unique_per_category_a) == (2, 2, 2)
