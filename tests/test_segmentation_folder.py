"""SegmentationFolder: known items from hand-made folders, every error names its file, Broden
round trip, and Network Dissection on a planted red detector."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dissect import DataError
from dissect.datasets.broden import Broden
from dissect.datasets.concepts import Concept, ConceptDataset
from dissect.datasets.segmentation_folder import SegmentationFolder
from dissect.datasets.writer import write_broden
from dissect.netdissect import dissect

LABELS = ("number,name,category\n"
          "1,red,color\n2,green,color\n300,sky,object\n7,tree,object\n"
          "6,city,scene\n5,beach,scene\n9,unused,color\n")


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.transpose(2, 0, 1) / np.float32(255))


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _palette_png(path: Path, indices: np.ndarray) -> None:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette([(i * 37) % 256 for i in range(768)])  # colors unlike the indices
    image.save(path)


def make_folder(root: Path) -> dict:
    """A folder of known content: color and object masks (8-bit, 16-bit, palette), scenes as
    image-level labels, images of four sizes in png and jpg. Returns the raw arrays."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.csv").write_text(LABELS)
    raw = {"a": _rgb(20, 30, 0), "b": _rgb(40, 40, 1), "c": _rgb(16, 16, 2), "d": _rgb(10, 12, 3)}
    for key, rgb in raw.items():
        suffix = ".jpg" if key == "b" else ".png"
        assert cv2.imwrite(str(root / "images" / f"{key}{suffix}"), rgb[:, :, ::-1])
    raw["b"] = cv2.imread(str(root / "images" / "b.jpg"))[:, :, ::-1]  # as decoded
    a_color = np.zeros((8, 8), np.uint8)
    a_color[:3, :4] = 1
    a_color[5:, :] = 2
    a_object = np.zeros((8, 8), np.uint16)
    a_object[:2] = 300
    a_object[6:, 6:] = 7
    b_color = np.zeros((8, 8), np.uint8)
    b_color[2:6, 2:6] = 2
    d_object = np.full((8, 8), 7, np.uint8)
    assert cv2.imwrite(str(root / "masks" / "a.color.png"), a_color)
    assert cv2.imwrite(str(root / "masks" / "a.object.png"), a_object)
    _palette_png(root / "masks" / "b.color.png", b_color)
    assert cv2.imwrite(str(root / "masks" / "d.object.png"), d_object)
    (root / "image_labels.csv").write_text("image,number\nb,5\na,6\na,5\n")
    return {"raw": raw, "planes": {"a": [a_color, a_object], "b": [b_color], "c": [],
                                   "d": [d_object]}}


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "seg"
    return root, make_folder(root)


def test_image_labels_name_an_id_or_a_file_name(folder) -> None:
    root, _ = folder
    by_id = SegmentationFolder(root)
    (root / "image_labels.csv").write_text("image,number\nb.jpg,5\na.png,6\na,5\n")
    by_file = SegmentationFolder(root)
    for i in range(len(by_id)):
        assert by_file[i]["image_labels"].tolist() == by_id[i]["image_labels"].tolist()
        assert by_file.item_categories(i) == by_id.item_categories(i)


def test_items_are_the_files(folder) -> None:
    root, known = folder
    ds = SegmentationFolder(root)
    assert isinstance(ds, ConceptDataset)
    assert ds.ids == ["a", "b", "c", "d"] and len(ds) == 4
    assert ds.categories == ["color", "object", "scene"]
    assert ds.concepts == [Concept(1, "red", "color"), Concept(2, "green", "color"),
                           Concept(5, "beach", "scene"), Concept(6, "city", "scene"),
                           Concept(7, "tree", "object"), Concept(9, "unused", "color"),
                           Concept(300, "sky", "object")]
    assert ds.size == (16, 16) and ds.segmentation_size == (8, 8)
    expected_labels = {"a": [5, 6], "b": [5], "c": [], "d": []}
    expected_annotated = {"a": [True, True, True], "b": [True, False, True],
                          "c": [False, False, False], "d": [False, True, False]}
    for i, key in enumerate(ds.ids):
        item = ds[i]
        assert list(item) == ["image", "pixel_labels", "image_labels", "annotated", "index"]
        assert item["index"] == i
        planes = known["planes"][key]
        assert item["pixel_labels"].dtype == torch.int64
        assert item["pixel_labels"].shape == (len(planes), 8, 8)
        for got, want in zip(item["pixel_labels"], planes, strict=True):
            assert np.array_equal(got.numpy(), want)  # palette PNG: its indices, not colors
        assert item["image_labels"].tolist() == expected_labels[key]
        assert item["annotated"].tolist() == expected_annotated[key]
        raw = known["raw"][key]
        grows = raw.shape[0] < 16 or raw.shape[1] < 16
        flag = cv2.INTER_LINEAR if grows else cv2.INTER_AREA
        want = raw if raw.shape[:2] == (16, 16) else cv2.resize(raw, (16, 16), interpolation=flag)
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert torch.equal(item["image"], _tensor(want))
        ann = ds.annotations(i)
        assert all(torch.equal(torch.as_tensor(ann[k]), torch.as_tensor(item[k]))
                   for k in ("pixel_labels", "image_labels", "annotated", "index"))
    assert ds.item_categories(0) == (["color", "object"], ["scene", "scene"])
    assert ds.item_categories(1) == (["color"], ["scene"])
    assert ds.filename(1) == root / "images" / "b.jpg"
    assert ds.mask_files(0) == [root / "masks" / "a.color.png", root / "masks" / "a.object.png"]
    assert repr(ds).startswith(f"SegmentationFolder({str(root)!r}: 4 images at 16x16, "
                               "segmentation 8x8, 7 concepts")
    assert ds[-1]["index"] == 3
    with pytest.raises(IndexError):
        ds[4]


def test_size_and_transform(folder) -> None:
    root, known = folder
    ds = SegmentationFolder(root, size=(12, 20), transform=lambda x: x * 2)
    item = ds[2]
    assert item["image"].shape == (3, 12, 20) and item["pixel_labels"].shape == (0, 8, 8)
    want = cv2.resize(known["raw"]["c"], (20, 12), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(item["image"], 2 * _tensor(want))
    assert SegmentationFolder(root, size=10).size == (10, 10)
    for bad in (0, (3,), (4, -1), 2.5, True):
        with pytest.raises(DataError, match="size must be"):
            SegmentationFolder(root, size=bad)


def test_folder_without_masks_needs_size(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "images").mkdir(parents=True)
    (root / "labels.csv").write_text("number,name,category\n1,beach,scene\n")
    cv2.imwrite(str(root / "images" / "x.png"), _rgb(9, 9, 0))
    (root / "image_labels.csv").write_text("image,number\nx,1\n")
    with pytest.raises(DataError, match="holds no mask: give size="):
        SegmentationFolder(root)
    ds = SegmentationFolder(root, size=(15, 20))
    assert ds.segmentation_size == (7, 10)
    item = ds[0]
    assert item["pixel_labels"].shape == (0, 7, 10) and item["image_labels"].tolist() == [1]
    assert item["annotated"].tolist() == [True]


def test_other_files_in_images_are_named_in_a_warning(folder, caplog) -> None:
    root, _ = folder
    (root / "images" / "notes.txt").write_text("x")
    (root / "images" / ".DS_Store").write_text("x")
    (root / "images" / "e.bmp").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="dissect"):
        assert len(SegmentationFolder(root)) == 4
    assert "ignored 2 entries that are not .png/.jpg image files, e.g. e.bmp, notes.txt" \
        in caplog.text


def test_cache_identity_follows_the_masks(folder) -> None:
    root, _ = folder
    one = SegmentationFolder(root).cache_identity()
    assert one == SegmentationFolder(root, size=40).cache_identity()  # images do not matter
    path = root / "masks" / "a.color.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert SegmentationFolder(root).cache_identity() != one


def test_write_broden_round_trip(folder, tmp_path: Path) -> None:
    root, _ = folder
    ds = SegmentationFolder(root)
    back = Broden(write_broden(ds, tmp_path / "broden"))
    assert back.categories == ds.categories and back.concepts == ds.concepts
    assert len(back) == len(ds)
    for i in range(len(ds)):
        a, b = ds[i], back[i]
        for key in ("image", "pixel_labels", "image_labels", "annotated"):
            assert torch.equal(a[key], b[key]), (i, key)
        assert back.item_categories(i) == ds.item_categories(i)


# ---------------------------------------------------------------- errors when opened

def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_text(text)


def _labels(text: str) -> Callable[[Path], None]:
    return _write("labels.csv", "number,name,category\n" + text)


def _image_labels(text: str) -> Callable[[Path], None]:
    return _write("image_labels.csv", "image,number\n" + text)


def _mask(name: str, array: np.ndarray | None = None) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        cv2.imwrite(str(root / "masks" / name), np.zeros((8, 8), np.uint8) if array is None
                    else array)
    return edit


OPEN_ERRORS = {
    "no labels.csv": (lambda r: (r / "labels.csv").unlink(), ["labels.csv is missing"]),
    "no images": (lambda r: os.rename(r / "images", r / "pictures"), ["images is missing"]),
    "header": (_write("labels.csv", "number,label,category\n1,red,color\n"),
               ["labels.csv line 1", "lacks the columns ['name']"]),
    "duplicate": (_labels("1,red,color\n2,green,color\n1,blue,color\n"),
                  ["labels.csv line 4", "label number 1 appears twice", "line 2"]),
    "zero": (_labels("0,red,color\n"), ["labels.csv line 2", "'number' is '0'"]),
    "negative": (_labels("1,red,color\n-2,x,color\n"), ["labels.csv line 3", "'-2'"]),
    "too large": (_labels("65536,red,color\n"), ["labels.csv line 2", "[1, 65535]"]),
    "not an integer": (_labels("1.5,red,color\n"), ["labels.csv line 2", "'1.5'"]),
    "empty name": (_labels("1,red,color\n2, ,color\n"),
                   ["labels.csv line 3", "label 2 has an empty name"]),
    "same name": (_labels("1,red,color\n2,red,color\n"),
                  ["labels.csv line 3", "'red' of category 'color' appears twice"]),
    "dotted category": (_labels("1,red,co.lor\n"), ["labels.csv line 2", "category 'co.lor'"]),
    "reserved category": (_labels("1,red,split\n"), ["labels.csv line 2", "index.csv"]),
    "no labels": (_labels(""), ["labels.csv lists no labels"]),
    "mask without image": (_mask("zz.color.png"), ["masks/zz.color.png", "no image"]),
    "mask without category": (_mask("a.png"), ["masks/a.png", "has no category"]),
    "unknown category": (_mask("a.shape.png"),
                         ["masks/a.shape.png", "category 'shape' is not in labels.csv"]),
    "jpeg mask": (lambda r: cv2.imwrite(str(r / "masks" / "c.color.jpg"), _rgb(8, 8, 0)),
                  ["masks/c.color.jpg", "is not a mask file"]),
    "png and jpg": (lambda r: cv2.imwrite(str(r / "images" / "a.jpg"), _rgb(8, 8, 0)),
                    ["images/a.png", "images/a.jpg", "id 'a'"]),
    "image label for unknown image": (_image_labels("a,5\nzz,5\n"),
                                      ["image_labels.csv line 3", "image 'zz'"]),
    "image label with another suffix": (_image_labels("a.jpg,5\n"),
                                        ["image_labels.csv line 2", "image 'a.jpg'",
                                         "the image of id 'a' is images/a.png"]),
    "unknown image label": (_image_labels("a,8\n"),
                            ["image_labels.csv line 2", "label 8 is not in labels.csv"]),
    "image label of a pixel category": (
        _image_labels("a,1\n"),
        ["image_labels.csv line 2", "category 'color', which has pixel masks",
         "masks/a.color.png"]),
    "repeated image label": (_image_labels("a,5\nb,5\na,5\n"),
                             ["image_labels.csv line 4", "label 5 twice", "line 2"]),
    "bad image label number": (_image_labels("a,x\n"), ["image_labels.csv line 2", "'x'"]),
    "first mask not a png": (lambda r: (r / "masks" / "a.color.png").write_bytes(b"hello"),
                             ["masks/a.color.png", "is not a PNG file"]),
    "not a folder": (lambda r: None, []),
}


@pytest.mark.parametrize("case", sorted(OPEN_ERRORS))
def test_errors_when_opened_name_the_file(folder, case: str) -> None:
    root, _ = folder
    edit, parts = OPEN_ERRORS[case]
    edit(root)
    target = root / "nowhere" if case == "not a folder" else root
    with pytest.raises(DataError) as info:
        SegmentationFolder(target)
    message = str(info.value)
    for part in parts or ["nowhere does not exist"]:
        assert part in message, message


# ---------------------------------------------------------------- errors when read

def _truncate(root: Path) -> None:
    path = root / "masks" / "a.object.png"
    path.write_bytes(path.read_bytes()[:60])


READ_ERRORS = {
    "wrong size": (_mask("a.object.png", np.zeros((4, 6), np.uint8)),
                   ["masks/a.object.png is 4x6 pixels", "masks are 8x8"]),
    "rgb mask": (_mask("a.object.png", np.zeros((8, 8, 3), np.uint8)),
                 ["masks/a.object.png is a RGB PNG", "single-channel", "R + 256 * G",
                  "Broden"]),
    "unlisted label": (_mask("a.object.png", np.full((8, 8), 255, np.uint8)),
                       ["masks/a.object.png holds label 255", "does not list",
                        "add it to labels.csv", "set it to 0"]),
    "label of another category": (_mask("a.color.png", np.full((8, 8), 7, np.uint8)),
                                  ["masks/a.color.png holds label 7 ('tree')",
                                   "category 'object', not 'color'"]),
    "truncated mask": (_truncate, ["masks/a.object.png"]),
    "corrupt image": (lambda r: (r / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nxx"),
                      ["images/a.png"]),
    "directory mask": (lambda r: ((r / "masks" / "a.object.png").unlink(),
                                  (r / "masks" / "a.object.png").mkdir()),
                       ["masks/a.object.png", "not a mask file"]),
}


@pytest.mark.parametrize("case", sorted(READ_ERRORS))
def test_errors_when_read_name_the_file(folder, case: str) -> None:
    root, _ = folder
    edit, parts = READ_ERRORS[case]
    edit(root)
    with pytest.raises(DataError) as info:
        ds = SegmentationFolder(root)
        ds[0]
    message = str(info.value)
    for part in parts:
        assert part in message, message


def test_low_bit_and_16_bit_masks(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.csv").write_text("number,name,category\n1,fg,object\n65535,top,part\n")
    cv2.imwrite(str(root / "images" / "x.png"), _rgb(4, 4, 0))
    bits = np.array([[0, 1], [1, 0]], dtype=bool)
    Image.fromarray(bits).save(root / "masks" / "x.object.png")  # a 1-bit gray PNG: 0 and 1
    top = np.array([[65535, 0], [0, 65535]], np.uint16)
    cv2.imwrite(str(root / "masks" / "x.part.png"), top)
    planes = SegmentationFolder(root)[0]["pixel_labels"].numpy()
    assert np.array_equal(planes[0], bits.astype(np.int64)) and np.array_equal(planes[1], top)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint8)).convert("LA").save(buffer, "PNG")
    (root / "masks" / "x.part.png").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=r"x\.part\.png is a gray \+ alpha PNG"):
        SegmentationFolder(root)[0]


# ---------------------------------------------------------------- Network Dissection

class RedDetector(nn.Module):
    """A 1x1 convolution whose unit 0 is ReLU(R - G - B - 0.5): 0.5 on pure red, 0 on the gray
    background; unit 1 is the same for green."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1]]).view(2, 3, 1, 1))
            self.conv.bias.fill_(-0.5)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def test_netdissect_labels_the_planted_unit(tmp_path: Path) -> None:
    root = tmp_path / "planted"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.csv").write_text("number,name,category\n1,red,color\n2,green,color\n"
                                     "3,square,shape\n")
    rng = np.random.default_rng(5)
    for k in range(12):
        mask = np.zeros((8, 8), np.uint8)
        y, x = rng.integers(0, 5, 2)
        mask[y : y + 3, x : x + 3] = 1
        mask[rng.random((8, 8)) < 0.1] = 2
        shape = np.where(rng.random((8, 8)) < 0.3, 3, 0).astype(np.uint8)
        rgb = (rng.uniform(0.3, 0.6, (16, 16, 3)) * 255).round().astype(np.uint8)
        full = np.kron(mask, np.ones((2, 2), np.uint8))
        rgb[full == 1] = (255, 0, 0)
        rgb[full == 2] = (0, 255, 0)
        cv2.imwrite(str(root / "images" / f"{k:02d}.png"), rgb[:, :, ::-1])
        cv2.imwrite(str(root / "masks" / f"{k:02d}.color.png"), mask)
        cv2.imwrite(str(root / "masks" / f"{k:02d}.shape.png"), shape)
    ds = SegmentationFolder(root)
    kwargs = dict(layers=["relu"], quantile=0.5, batch_size=5, progress=False,
                  device="cpu", annotation_cache=False)
    res = dissect(RedDetector(), ds, store_path=tmp_path / "a.h5", **kwargs)
    units = res.units("relu")
    assert [(u.concept, u.category) for u in units] == [("red", "color"), ("green", "color")]
    assert units[0].iou == 1.0 and units[1].iou == 1.0
    broden = Broden(write_broden(ds, tmp_path / "broden"))
    ref = dissect(RedDetector(), broden, store_path=tmp_path / "b.h5", **kwargs)
    assert np.array_equal(res.iou("relu"), ref.iou("relu"))
    cached = dissect(RedDetector(), ds, store_path=tmp_path / "c.h5",
                     **{**kwargs, "annotation_cache": tmp_path / "cache"})
    again = dissect(RedDetector(), ds, store_path=tmp_path / "d.h5",
                    **{**kwargs, "annotation_cache": tmp_path / "cache"})
    assert np.array_equal(cached.iou("relu"), res.iou("relu"))
    assert np.array_equal(again.iou("relu"), res.iou("relu"))
    assert list((tmp_path / "cache" / "annotations").glob("SegmentationFolder-*.h5"))
