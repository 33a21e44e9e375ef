"""check_dataset and `dissect data check`: exact counts on hand-made folders, the first bad
file named."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import dissect.cli as cli
from dissect import DataError
from dissect.datasets.check import CategoryCheck, ConceptCheck, DatasetCheck, check_dataset
from dissect.datasets.concepts import Concept
from dissect.datasets.synthetic import SyntheticConcepts
from dissect.datasets.writer import write_broden


def make_folder(root: Path) -> Path:
    """Counts by hand: red 2 px in 1 image, green 1 + 4 px in 2, sky 4 px in 1, unused none;
    beach in images a and c, city in c; color annotated on a, b; object on a; scene on a, c."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.csv").write_text("number,name,category\n1,red,color\n2,green,color\n"
                                     "3,sky,object\n10,beach,scene\n11,city,scene\n"
                                     "4,unused,object\n")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (6, 8), "b.jpg": (10, 4), "c.png": (6, 6)}.items():
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 256, (h, w, 3), np.uint8))
    cv2.imwrite(str(root / "masks" / "a.color.png"),
                np.array([[1, 1, 0], [2, 0, 0], [0, 0, 0]], np.uint8))
    cv2.imwrite(str(root / "masks" / "a.object.png"),
                np.array([[3, 3, 3], [0, 0, 0], [0, 0, 3]], np.uint16))
    palette = Image.fromarray(np.array([[2, 2, 2], [2, 0, 0], [0, 0, 0]], np.uint8), mode="P")
    palette.putpalette([255 - (i % 256) for i in range(768)])
    palette.save(root / "masks" / "b.color.png")
    (root / "image_labels.csv").write_text("image,number\na,10\nc,11\nc,10\n")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "seg")


def test_counts_are_exact(folder: Path) -> None:
    result = check_dataset(folder, progress=False)
    assert isinstance(result, DatasetCheck)
    assert result.kind == "segmentation-folder" and result.path == str(folder)
    assert result.images == 3
    assert result.image_size_min == (6, 4) and result.image_size_max == (10, 8)
    assert result.segmentation_size_min == result.segmentation_size_max == (3, 3)
    assert result.categories == (
        CategoryCheck("color", 2, pytest.approx(1 / 3), 2, 0),
        CategoryCheck("object", 1, pytest.approx(2 / 3), 1, 0),
        CategoryCheck("scene", 2, pytest.approx(1 / 3), 0, 3),
    )
    assert result.concepts == (
        ConceptCheck(1, "red", "color", 2, 1), ConceptCheck(2, "green", "color", 5, 2),
        ConceptCheck(3, "sky", "object", 4, 1), ConceptCheck(4, "unused", "object", 0, 0),
        ConceptCheck(10, "beach", "scene", 0, 2), ConceptCheck(11, "city", "scene", 0, 1),
    )
    text = result.summary()
    assert "images: 3 (6x4 to 10x8)" in text and "segmentation: 3x3" in text
    assert "1 of 6 concepts appear in no image" in text
    doc = json.loads(result.to_json())
    assert doc["format"] == "torch-dissect dataset check" and doc["images"] == 3
    assert doc["concepts"][1] == {"number": 2, "name": "green", "category": "color",
                                  "pixels": 5, "images": 2}


class _Parts:
    """Two overlapping part planes on one image: label 1 where either plane holds it."""

    categories = ["part", "scene"]
    concepts = [Concept(1, "wheel", "part"), Concept(2, "door", "part"),
                Concept(5, "street", "scene")]
    transform = None

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        planes = torch.zeros(2, 4, 4, dtype=torch.int64)
        planes[0, :2] = 1   # 8 pixels
        planes[1, 1:3] = 1  # 8 pixels, 4 of them shared with plane 0
        planes[1, 3, :3] = 2
        return {"image": torch.full((3, 8, 8), 0.5), "pixel_labels": planes if i == 0
                else planes[:0], "image_labels": torch.tensor([5] if i else [], dtype=torch.int64),
                "annotated": torch.tensor([i == 0, i == 1]), "index": i}

    def item_categories(self, i: int) -> tuple[list[str], list[str]]:
        return (["part", "part"], []) if i == 0 else ([], ["scene"])


def test_broden_counts_each_pixel_once(tmp_path: Path) -> None:
    root = write_broden(_Parts(), tmp_path / "b")
    result = check_dataset(root, progress=False)
    assert result.kind == "broden" and result.images == 2
    assert result.image_size_min == result.image_size_max == (8, 8)
    assert result.segmentation_size_min == (4, 4)
    assert [(c.name, c.pixels, c.images) for c in result.concepts] == [
        ("wheel", 12, 1), ("door", 3, 1), ("street", 0, 1)]
    assert result.categories == (CategoryCheck("part", 1, 0.5, 2, 0),
                                 CategoryCheck("scene", 1, 0.5, 0, 1))


def test_broden_counts_equal_a_naive_loop(tmp_path: Path) -> None:
    ds = SyntheticConcepts(10, size=32, seed=4, unannotated=0.3)
    result = check_dataset(write_broden(ds, tmp_path / "b"), progress=False)
    pixels, images = {}, {}
    for i in range(len(ds)):
        item = ds[i]
        planes = item["pixel_labels"].numpy()
        for c in ds.concepts:
            hit = (planes == c.number).any(axis=0) if len(planes) else np.zeros(0, bool)
            pixels[c.number] = pixels.get(c.number, 0) + int(hit.sum())
            present = hit.any() or c.number in item["image_labels"].tolist()
            images[c.number] = images.get(c.number, 0) + int(present)
    assert {c.number: c.pixels for c in result.concepts} == pixels
    assert {c.number: c.images for c in result.concepts} == images
    assert sum(c.pixels for c in result.concepts) > 0


def test_first_bad_file_is_named(folder: Path) -> None:
    (folder / "images" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DataError, match=r"images/c\.png"):
        check_dataset(folder, progress=False)
    make_folder(folder.parent / "two")
    cv2.imwrite(str(folder.parent / "two" / "masks" / "b.color.png"), np.zeros((4, 3), np.uint8))
    with pytest.raises(DataError, match=r"masks/b\.color\.png is 4x3 pixels"):
        check_dataset(folder.parent / "two", progress=False)
    (folder.parent / "empty").mkdir()
    with pytest.raises(DataError, match="neither a Broden folder"):
        check_dataset(folder.parent / "empty", progress=False)


def test_folder_without_masks(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "images").mkdir(parents=True)
    (root / "labels.csv").write_text("number,name,category\n1,beach,scene\n")
    cv2.imwrite(str(root / "images" / "x.png"), np.zeros((5, 7, 3), np.uint8))
    (root / "image_labels.csv").write_text("image,number\nx,1\n")
    result = check_dataset(root, progress=False)
    assert result.segmentation_size_min is None and result.image_size_max == (5, 7)
    assert result.concepts == (ConceptCheck(1, "beach", "scene", 0, 1),)
    assert "segmentation: none" in result.summary()


# ---------------------------------------------------------------- the command


def test_cli_prints_the_summary(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report" / "check.json"
    assert cli.main(["data", "check", str(folder), "--json", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == check_dataset(folder, progress=False).summary() + "\n"
    assert captured.err == ""
    doc = json.loads(out.read_text())
    assert doc["kind"] == "segmentation-folder"
    assert [c["pixels"] for c in doc["concepts"]] == [2, 5, 4, 0, 0, 0]


def test_cli_bad_folder_is_one_line(folder: Path, capsys) -> None:
    cv2.imwrite(str(folder / "masks" / "c.color.png"), np.full((3, 3), 9, np.uint8))
    assert cli.main(["data", "check", str(folder)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("dissect data check: error: mask ")
    assert "c.color.png holds label 9" in lines[-1]
    assert captured.out == ""
    assert cli.main(["data", "check", str(folder / "nope")]) == 1
    assert "nope does not exist" in capsys.readouterr().err
    assert cli.main(["data", "check", str(folder), "--json", str(folder / "masks")]) == 1
    assert "--json" in capsys.readouterr().err
