"""Broden reader: a hand-written Broden folder (written here with csv + cv2) reads exactly."""

from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dissect import DataError, DissectError
from dissect.datasets import Broden, Concept, ConceptDataset, read_label_png

SH, SW, IH, IW = 4, 5, 8, 10  # non-square, to catch transposed axes

LABELS = [  # number, name, category, frequency, coverage, syns
    (1, "black", "color(2)", 2, 0.5, ""),
    (2, "red-c", "color(1)", 1, 0.3, "red"),
    (3, "person", "object(1)", 1, 0.4, ""),
    (5, "fabric", "material(2);object(1)", 3, 0.9, "cloth;textile"),
    (6, "car", "object(1);part(1)", 2, 0.4, ""),
    (7, "street", "scene(2)", 2, 2.0, ""),
    (8, "striped", "texture(1)", 1, 1.0, ""),
    (9, "dotted", "texture(1)", 1, 1.0, ""),
    (300, "head", "part(1)", 1, 0.1, ""),
    (513, "window", "object(2)", 2, 0.2, ""),
]
CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
C_FILES = {  # category -> rows (code, number, name, frequency, coverage)
    "color": [(1, 1, "black", 2, 0.5), (2, 2, "red-c", 1, 0.3)],
    "object": [(1, 3, "person", 1, 0.4), (2, 5, "fabric", 1, 0.1), (3, 6, "car", 1, 0.2),
               (4, 513, "window", 2, 0.2)],
    "part": [(1, 300, "head", 1, 0.1), (2, 6, "car", 1, 0.2)],  # car: a tie -> later (part)
    "material": [(1, 5, "fabric", 2, 0.8)],  # fabric: material beats object
    "scene": [(1, 7, "street", 2, 2.0)],
    "texture": [(1, 8, "striped", 1, 1.0), (2, 9, "dotted", 1, 1.0)],
}
EXPECTED_CONCEPTS = [
    Concept(1, "black", "color"),
    Concept(2, "red-c", "color"),
    Concept(3, "person", "object"),
    Concept(5, "fabric", "material"),
    Concept(6, "car", "part"),
    Concept(7, "street", "scene"),
    Concept(8, "striped", "texture"),
    Concept(9, "dotted", "texture"),
    Concept(300, "head", "part"),
    Concept(513, "window", "object"),
]


def _planes() -> dict[str, np.ndarray]:
    color = np.ones((SH, SW), np.int64)
    color[:, 3:] = 2
    obj = np.zeros((SH, SW), np.int64)
    obj[0, :2], obj[1:3, 1:4], obj[3, 4] = 3, 513, 5
    part1 = np.zeros((SH, SW), np.int64)
    part1[1, :], part1[2, 2:] = 300, 6
    part2 = np.zeros((SH, SW), np.int64)
    part2[0, 4], part2[3, 0] = 300, 300
    material = np.zeros((SH, SW), np.int64)
    material[2:, :2] = 5
    c_object = np.full((SH, SW), 6, np.int64)
    c_object[:, 0] = 513
    return {"a_color": color, "a_object": obj, "a_part_1": part1, "a_part_2": part2,
            "a_material": material, "b_color": np.ones((SH, SW), np.int64),
            "c_object": c_object}


def _write_png_labels(path: Path, labels: np.ndarray, alpha: bool = False) -> None:
    """RG-encode by hand: OpenCV writes BGR, so R (label % 256) is channel 2."""
    bgr = np.zeros((*labels.shape, 4 if alpha else 3), np.uint8)
    bgr[..., 2] = labels % 256
    bgr[..., 1] = labels // 256
    if alpha:
        bgr[..., 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), bgr)


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


INDEX_HEADER = ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES]
INDEX_ROWS = [
    ["ade/a.png", "train", IH, IW, SH, SW, "ade/a_color.png", "ade/a_object.png",
     "ade/a_part_1.png;ade/a_part_2.png", "ade/a_material.png", "7", ""],
    ["dtd/b.jpg", "val", IH, IW, SH, SW, "dtd/b_color.png", "", "", "", "0", "8;9"],
    ["ade/c.png", "train", IH, IW, SH, SW, "", "ade/c_object.png", "", "", "7;0", ""],
]


def make_broden(root: Path, index_rows: list | None = None) -> dict[str, np.ndarray]:
    """Write a small Broden folder by hand; return the images (RGB) by name."""
    rng = np.random.default_rng(0)
    images = {}
    for name in ("ade/a.png", "dtd/b.jpg", "ade/c.png"):
        rgb = rng.integers(0, 256, (IH, IW, 3), dtype=np.uint8)
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        images[name] = rgb
    folders = {"a": "ade", "b": "dtd", "c": "ade"}
    for stem, labels in _planes().items():
        path = root / "images" / folders[stem[0]] / f"{stem}.png"
        _write_png_labels(path, labels, alpha=stem == "a_part_2")
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               LABELS)
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"],
               [[c, 0, 0, len(C_FILES[c]), 1] for c in CATEGORIES])
    for cat, rows in C_FILES.items():
        _write_csv(root / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
                   rows)
    _write_csv(root / "index.csv", INDEX_HEADER, INDEX_ROWS if index_rows is None else index_rows)
    return images


@pytest.fixture
def broden_root(tmp_path: Path) -> Path:
    make_broden(tmp_path)
    return tmp_path


def test_reads_hand_written_broden_exactly(broden_root: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dissect.datasets"):
        ds = Broden(broden_root)
    zero_warnings = [r for r in caplog.records if "label 0" in r.getMessage()]
    assert len(zero_warnings) == 1 and "scene" in zero_warnings[0].getMessage()
    assert isinstance(ds, ConceptDataset)
    assert ds.categories == CATEGORIES
    assert ds.concepts == EXPECTED_CONCEPTS
    assert ds.labels[5].syns == ("cloth", "textile")
    assert ds.labels[5].categories == {"material": 2, "object": 1}
    assert len(ds) == 3 and ds.splits == ["train", "val", "train"]
    p = _planes()

    a = ds[0]
    assert set(a) == {"image", "pixel_labels", "image_labels", "annotated", "index"}
    assert a["image"].dtype == torch.float32 and a["image"].shape == (3, IH, IW)
    rgb = cv2.cvtColor(cv2.imread(str(broden_root / "images/ade/a.png")), cv2.COLOR_BGR2RGB)
    assert torch.equal(a["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    expected = np.stack([p["a_color"], p["a_object"], p["a_part_1"], p["a_part_2"],
                         p["a_material"]])
    assert a["pixel_labels"].dtype == torch.int64
    assert torch.equal(a["pixel_labels"], torch.from_numpy(expected))
    assert int(a["pixel_labels"].max()) == 513  # labels > 255 decode as R + 256 * G
    assert a["image_labels"].tolist() == [7]
    assert a["annotated"].tolist() == [True, True, True, True, True, False]
    assert a["index"] == 0

    b = ds[1]  # jpeg image; scene 0 is "no label"; two image-level textures
    assert b["image"].shape == (3, IH, IW)
    assert torch.equal(b["pixel_labels"], torch.from_numpy(p["b_color"][None]))
    assert b["image_labels"].tolist() == [8, 9]
    assert b["annotated"].tolist() == [True, False, False, False, False, True]

    c = ds[2]
    assert torch.equal(c["pixel_labels"], torch.from_numpy(p["c_object"][None]))
    assert c["image_labels"].tolist() == [7]
    assert c["annotated"].tolist() == [False, True, False, False, True, False]
    assert ds.item_categories(0) == (["color", "object", "part", "part", "material"], ["scene"])


def test_label_png_decoding_is_red_plus_256_green(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 255], [256, 513, 65535]])
    _write_png_labels(tmp_path / "x.png", labels)
    assert np.array_equal(read_label_png(tmp_path / "x.png"), labels)
    _write_png_labels(tmp_path / "y.png", labels, alpha=True)
    assert np.array_equal(read_label_png(tmp_path / "y.png"), labels)


def test_split_and_categories(broden_root: Path) -> None:
    train = Broden(broden_root, split="train")
    assert len(train) == 2 and train[1]["image_labels"].tolist() == [7]
    assert train.filename(1) == broden_root / "images/ade/c.png"
    val = Broden(broden_root, split="val")
    assert len(val) == 1 and val[0]["image_labels"].tolist() == [8, 9]
    sub = Broden(broden_root, categories=["scene", "object"])
    assert sub.categories == ["object", "scene"]  # category.csv order
    assert sub.concepts == [
        Concept(3, "person", "object"), Concept(5, "fabric", "object"),
        Concept(6, "car", "object"), Concept(7, "street", "scene"),
        Concept(513, "window", "object"),
    ]
    a = sub[0]
    assert torch.equal(a["pixel_labels"], torch.from_numpy(_planes()["a_object"][None]))
    assert a["image_labels"].tolist() == [7] and a["annotated"].tolist() == [True, True]
    with pytest.raises(DataError, match="no rows with split 'test'.*train"):
        Broden(broden_root, split="test")
    with pytest.raises(DataError, match="unknown categories.*'colour'"):
        Broden(broden_root, categories=["colour"])


def test_transform_and_pickle(broden_root: Path) -> None:
    ds = Broden(broden_root)
    ds.transform = lambda x: x * 0 + 1
    assert torch.equal(ds[0]["image"], torch.ones(3, IH, IW))
    ds.transform = None
    clone = pickle.loads(pickle.dumps(ds))
    for i in range(len(ds)):
        for key, value in ds[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(clone[i][key]))


def _rows(**changes) -> list[list]:
    rows = [list(r) for r in INDEX_ROWS]
    for (r, c), v in changes.get("cells", {}).items():
        rows[r][c] = v
    return rows


def test_missing_image(tmp_path: Path) -> None:
    make_broden(tmp_path)
    (tmp_path / "images/dtd/b.jpg").unlink()
    ds = Broden(tmp_path)
    with pytest.raises(DataError, match=r"index.csv line 3: image .*dtd/b.jpg is missing"):
        ds[1]


def test_missing_png(tmp_path: Path) -> None:
    make_broden(tmp_path)
    (tmp_path / "images/ade/a_part_2.png").unlink()
    ds = Broden(tmp_path)
    with pytest.raises(DataError, match=r"index.csv line 2: part label PNG .*a_part_2.png"):
        ds[0]


def test_png_of_wrong_size(tmp_path: Path) -> None:
    make_broden(tmp_path)
    _write_png_labels(tmp_path / "images/ade/c_object.png", np.ones((SW, SH), np.int64))
    with pytest.raises(DataError, match=r"index.csv line 4: .*c_object.png is 5x4.* 4x5"):
        Broden(tmp_path)[2]


def test_image_of_wrong_size(tmp_path: Path) -> None:
    make_broden(tmp_path)
    cv2.imwrite(str(tmp_path / "images/ade/c.png"), np.zeros((IH, IH, 3), np.uint8))
    with pytest.raises(DataError, match=r"line 4: image .*c.png is 8x8"):
        Broden(tmp_path)[2]


@pytest.mark.parametrize("number", [777, 4])  # above every known number; in a gap
def test_png_label_absent_from_label_csv(tmp_path: Path, number: int) -> None:
    make_broden(tmp_path)
    bad = _planes()["c_object"]
    bad[1, 1] = number
    _write_png_labels(tmp_path / "images/ade/c_object.png", bad)
    with pytest.raises(DataError, match=rf"line 4: object label PNG .*\[{number}\].*label.csv"):
        Broden(tmp_path)[2]


def test_image_label_absent_from_label_csv(tmp_path: Path) -> None:
    make_broden(tmp_path, _rows(cells={(1, 11): "8;99"}))
    with pytest.raises(DataError, match=r"index.csv line 3: texture label 99 is not in label.csv"):
        Broden(tmp_path)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([r[:-1] if k == 1 else r for k, r in enumerate(INDEX_ROWS)], r"line 3: malformed row"),
        (_rows(cells={(0, 2): "eight"}), r"line 2: malformed row: column 'ih'"),
        (_rows(cells={(2, 5): "-5"}), r"line 4: malformed row: column 'sw'"),
        (_rows(cells={(1, 10): "2.5"}), r"line 3: malformed row: scene entry '2.5'"),
        (_rows(cells={(0, 0): ""}), r"line 2: malformed row: empty image path"),
    ],
)
def test_malformed_index_rows(tmp_path: Path, rows: list, pattern: str) -> None:
    make_broden(tmp_path, rows)
    with pytest.raises(DataError, match=pattern):
        Broden(tmp_path)


def test_bad_metadata_files(tmp_path: Path) -> None:
    make_broden(tmp_path)
    with open(tmp_path / "label.csv", "a") as f:
        f.write("10,thing,object[3],1,0.1,\n")
    with pytest.raises(DataError, match=r"label.csv line 12: malformed row: category"):
        Broden(tmp_path)
    make_broden(tmp_path)
    with open(tmp_path / "c_object.csv", "a") as f:
        f.write("5,4242,ghost,1,0.1\n")
    with pytest.raises(DataError, match=r"c_object.csv line 6: label 4242 is not in label.csv"):
        Broden(tmp_path)
    make_broden(tmp_path)
    (tmp_path / "c_texture.csv").unlink()
    with pytest.raises(DissectError, match=r"c_texture.csv is missing"):
        Broden(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        Broden(tmp_path / "nowhere")
