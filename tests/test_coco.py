"""CocoConcepts: hand-written COCO JSON whose masks are known pixel by pixel."""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_datasets_writer import assert_same_items

from dissect import DataError, DissectError
from dissect.datasets.broden import Broden
from dissect.datasets.coco import CocoConcepts
from dissect.datasets.concepts import ConceptDataset, collate
from dissect.datasets.writer import write_broden

mask_api = pytest.importorskip("pycocotools.mask")
# pycocotools' decode under numpy 2 (its warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H1, W1 = 10, 12  # image 1
H2, W2 = 8, 8  # image 2
NEAREST = cv2.INTER_NEAREST_EXACT


def rect_mask() -> np.ndarray:
    """Polygon (2,1) (6,1) (6,5) (2,5): pixel columns 2..5, rows 1..4."""
    m = np.zeros((H1, W1), np.uint8)
    m[1:5, 2:6] = 1
    return m


def triangle_mask() -> np.ndarray:
    """Polygon (3,2) (11,2) (3,10): pycocotools keeps the pixels whose unit square lies inside,
    here x >= 3, y >= 2 and (x + 1 - 3) + (y + 1 - 2) <= 8."""
    yy, xx = np.mgrid[0:H1, 0:W1]
    return ((xx >= 3) & (yy >= 2) & (xx + yy <= 11)).astype(np.uint8)


def small_rect_mask() -> np.ndarray:
    """Polygon (0,0) (4,0) (4,3) (0,3): a second cat, overlapping the first."""
    m = np.zeros((H1, W1), np.uint8)
    m[0:3, 0:4] = 1
    return m


def disk_mask() -> np.ndarray:
    """Compressed RLE of a disk in image 1's bottom right, away from everything else."""
    yy, xx = np.mgrid[0:H1, 0:W1]
    return (((yy - 8) ** 2 + (xx - 10) ** 2) <= 2).astype(np.uint8)


UNCOMPRESSED = [3, 2, 10, 4, 45]  # image 2 (8x8), column-major: pixels 3-4 and 15-18 are 1


def rle_mask() -> np.ndarray:
    flat = np.zeros(H2 * W2, np.uint8)
    flat[3:5] = 1
    flat[15:19] = 1
    return flat.reshape((H2, W2), order="F")


def coco_json() -> dict:
    compressed = mask_api.encode(np.asfortranarray(disk_mask()))
    return {
        "images": [
            {"id": 7, "file_name": "a.png", "height": H1, "width": W1},
            {"id": 3, "file_name": "sub/b.png", "height": H2, "width": W2},
            {"id": 9, "file_name": "c.png", "height": 6, "width": 9},  # no instances
        ],
        "categories": [
            {"id": 18, "name": "dog"},
            {"id": 1, "name": "cat"},
            {"id": 38, "name": "kite"},
            {"id": 5, "name": "airplane"},  # in no annotation
        ],
        "annotations": [  # listed out of id order: packing follows the ids
            {"id": 12, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": [[0, 0, 4, 0, 4, 3, 0, 3]]},
            {"id": 11, "image_id": 7, "category_id": 18, "iscrowd": 0,
             "segmentation": [[3, 2, 11, 2, 3, 10]]},
            {"id": 10, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": [[2, 1, 6, 1, 6, 5, 2, 5], [0, 0, 1, 1]]},  # + a degenerate one
            {"id": 13, "image_id": 7, "category_id": 38, "iscrowd": 0,
             "segmentation": {"size": [H1, W1], "counts": compressed["counts"].decode()}},
            {"id": 20, "image_id": 3, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [H2, W2], "counts": UNCOMPRESSED}},
        ],
    }


def write_images(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = {}
    for name, (h, w) in {"a.png": (H1, W1), "sub/b.png": (H2, W2), "c.png": (6, 9)}.items():
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        images[name] = rgb
    return images


@pytest.fixture
def coco(tmp_path: Path):
    (tmp_path / "images").mkdir()
    images = write_images(tmp_path / "images")
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco_json()))
    return path, tmp_path / "images", images


def test_concept_table_and_contract(coco, caplog) -> None:
    path, images_dir, _ = coco
    with caplog.at_level(logging.WARNING):
        ds = CocoConcepts(path, images_dir, size=(H1, W1))
    assert "1 polygon(s) with fewer than 3 points dropped" in caplog.text
    assert isinstance(ds, ConceptDataset)
    assert ds.categories == ["object"]
    # numbered in order of COCO id: cat (1), airplane (5), dog (18), kite (38)
    assert [(c.number, c.name, c.category) for c in ds.concepts] == [
        (1, "cat", "object"), (2, "airplane", "object"), (3, "dog", "object"),
        (4, "kite", "object")]
    assert ds.coco_ids == {1: 1, 5: 2, 18: 3, 38: 4}
    assert len(ds) == 3 and ds.image_ids == [7, 3, 9]
    assert "3 images, 4 concepts" in repr(ds)
    item = ds[0]
    assert list(item) == ["image", "pixel_labels", "image_labels", "annotated", "index"]
    assert item["pixel_labels"].dtype == torch.int64 and item["image_labels"].shape == (0,)
    assert item["annotated"].tolist() == [True]
    ann = ds.annotations(0)
    assert torch.equal(ann["pixel_labels"], item["pixel_labels"]) and "image" not in ann
    with pytest.raises(IndexError):
        ds[3]


def test_each_encoding_decodes_to_the_mask_it_describes(coco) -> None:
    path, images_dir, _ = coco
    ds = CocoConcepts(path, images_dir, size=(H1, W1))
    np.testing.assert_array_equal(ds.instance_mask(0, 10), rect_mask())
    np.testing.assert_array_equal(ds.instance_mask(0, 11), triangle_mask())
    np.testing.assert_array_equal(ds.instance_mask(0, 12), small_rect_mask())
    np.testing.assert_array_equal(ds.instance_mask(0, 13), disk_mask())
    np.testing.assert_array_equal(ds.instance_mask(1, 20), rle_mask())


def test_masks_equal_pycocotools_ann_to_mask(coco) -> None:
    from pycocotools.coco import COCO

    path, images_dir, _ = coco
    ds = CocoConcepts(path, images_dir, size=4)
    oracle = COCO(str(path))
    for ann_id, ann in oracle.anns.items():
        i = ds.image_ids.index(ann["image_id"])
        np.testing.assert_array_equal(ds.instance_mask(i, ann_id), oracle.annToMask(ann))


def test_overlapping_instances_pack_into_planes(coco) -> None:
    path, images_dir, _ = coco
    ds = CocoConcepts(path, images_dir, size=(H1, W1))
    planes = ds[0]["pixel_labels"].numpy()
    cat = rect_mask() | small_rect_mask()  # both cats merge in plane 0
    expect0 = np.where(cat > 0, 1, 0) + np.where(disk_mask() > 0, 4, 0)
    expect1 = np.where(triangle_mask() > 0, 3, 0)  # the dog overlaps the cat: plane 1
    assert planes.shape == (2, H1, W1)
    np.testing.assert_array_equal(planes[0], expect0)
    np.testing.assert_array_equal(planes[1], expect1)
    assert ds.item_categories(0) == (["object", "object"], [])
    # image 2 at size (8, 8) is image 1's size too small: check it at its own size
    ds2 = CocoConcepts(path, images_dir, size=H2)
    np.testing.assert_array_equal(ds2[1]["pixel_labels"].numpy(), rle_mask()[None] * 1)
    # an image without instances: one all-zero plane, still annotated for "object"
    empty = ds2[2]
    assert empty["pixel_labels"].shape == (1, H2, H2) and not empty["pixel_labels"].any()
    assert empty["annotated"].tolist() == [True]


@pytest.mark.parametrize("size", [(5, 7), (17, 23)])
def test_resized_masks_are_nearest_exact_and_images_area_or_linear(coco, size) -> None:
    path, images_dir, images = coco
    ds = CocoConcepts(path, images_dir, size=size)
    h, w = size
    planes = ds[0]["pixel_labels"].numpy()
    assert planes.shape[1:] == (h, w)
    hand = {1: rect_mask() | small_rect_mask(), 3: triangle_mask(), 4: disk_mask()}
    for number, mask in hand.items():
        # the input pixel under each output pixel's center, from exact fractions
        rows, cols = ([math.floor(Fraction(2 * j + 1, 2 * s) * n) for j in range(s)]
                      for n, s in zip(mask.shape, size, strict=True))
        expect = mask[np.ix_(rows, cols)] > 0
        np.testing.assert_array_equal((planes == number).any(axis=0), expect)
        if size == (5, 7):  # no center on a pixel boundary: OpenCV agrees
            np.testing.assert_array_equal(expect, cv2.resize(mask, (w, h),
                                                             interpolation=NEAREST) > 0)
    assert set(np.unique(planes)) <= {0, 1, 3, 4}
    flag = cv2.INTER_AREA if h < H1 else cv2.INTER_LINEAR
    rgb = cv2.resize(images["a.png"], (w, h), interpolation=flag)
    torch.testing.assert_close(ds[0]["image"], torch.from_numpy(rgb).permute(2, 0, 1) / 255,
                               rtol=0, atol=1e-7)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["pixel_labels"].shape == (3, 2, h, w)
    ds.transform = lambda x: x * 0
    assert not ds[0]["image"].any()


def test_categories_filter_by_name_or_id(coco) -> None:
    path, images_dir, _ = coco
    ds = CocoConcepts(path, images_dir, size=(H1, W1), categories=["dog", 38])
    assert [(c.number, c.name) for c in ds.concepts] == [(1, "dog"), (2, "kite")]
    assert ds.coco_ids == {18: 1, 38: 2}
    planes = ds[0]["pixel_labels"].numpy()  # the cats are gone: one plane suffices
    np.testing.assert_array_equal(planes, (np.where(triangle_mask() > 0, 1, 0)
                                           + np.where(disk_mask() > 0, 2, 0))[None])
    assert ds.cache_identity() != CocoConcepts(path, images_dir, size=(H1, W1)).cache_identity()
    with pytest.raises(DataError, match=r"unknown COCO category 'dgo'.*close matches: \['dog'\]"):
        CocoConcepts(path, images_dir, categories=["dgo"])


def test_write_broden_round_trip(coco, tmp_path: Path) -> None:
    path, images_dir, _ = coco
    ds = CocoConcepts(path, images_dir, size=(6, 8))
    back = Broden(write_broden(ds, tmp_path / "broden"))
    assert back.categories == ds.categories and back.concepts == ds.concepts
    assert_same_items(ds, back)


def panoptic_json() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": H1, "width": W1},
                   {"id": 2, "file_name": "c.png", "height": 6, "width": 9}],  # no annotation
        "categories": [{"id": 1, "name": "cat", "isthing": 1},
                       {"id": 4, "name": "grass", "isthing": 0},
                       {"id": 9, "name": "sky", "isthing": 0}],
        "annotations": [{"image_id": 1, "file_name": "a_pan.png", "segments_info": [
            {"id": 5, "category_id": 1}, {"id": 300, "category_id": 4},
            {"id": 70000, "category_id": 9}]}],
    }


def segment_ids() -> np.ndarray:
    ids = np.zeros((H1, W1), np.int64)
    ids[:4, :] = 70000  # sky: B = 1, G = 17, R = 112
    ids[6:, :] = 300  # grass: G = 1, R = 44
    ids[2:8, 3:7] = 5  # a cat in front of both
    return ids


def write_panoptic(root: Path, ids: np.ndarray) -> None:
    bgr = np.stack([ids >> 16, (ids >> 8) & 255, ids & 255], axis=2).astype(np.uint8)
    assert cv2.imwrite(str(root / "a_pan.png"), bgr)


def test_panoptic_round_trip(coco, tmp_path: Path) -> None:
    _, images_dir, _ = coco
    (tmp_path / "pan").mkdir()
    write_panoptic(tmp_path / "pan", segment_ids())
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(panoptic_json()))
    ds = CocoConcepts(path, images_dir, size=(5, 6), panoptic_dir=tmp_path / "pan")
    assert ds.panoptic and ds.categories == ["object", "stuff"]
    assert [(c.name, c.category) for c in ds.concepts] == [("cat", "object"),
                                                          ("grass", "stuff"), ("sky", "stuff")]
    small = cv2.resize(segment_ids().astype(np.int32), (6, 5), interpolation=NEAREST)
    number = {0: 0, 5: 1, 300: 2, 70000: 3}
    labels = np.vectorize(number.get)(small)
    planes = ds[0]["pixel_labels"].numpy()
    np.testing.assert_array_equal(planes[0], np.where(labels == 1, 1, 0))
    np.testing.assert_array_equal(planes[1], np.where(labels > 1, labels, 0))
    assert ds.item_categories(0) == (["object", "stuff"], [])
    unannotated = ds[1]
    assert unannotated["pixel_labels"].shape == (0, 5, 6)
    assert unannotated["annotated"].tolist() == [False, False]
    back = Broden(write_broden(ds, tmp_path / "broden"))
    assert back.concepts == ds.concepts
    assert_same_items(ds, back)
    only = CocoConcepts(path, images_dir, size=(5, 6), categories=["sky"],
                        panoptic_dir=tmp_path / "pan")
    assert only.categories == ["stuff"]
    np.testing.assert_array_equal(only[0]["pixel_labels"].numpy(),
                                  np.where(labels == 3, 1, 0)[None])
    with pytest.raises(DataError, match="panoptic JSON .*pass panoptic_dir"):
        CocoConcepts(path, images_dir)
    with pytest.raises(DataError, match="panoptic_dir is given, but .* instance JSON"):
        CocoConcepts(coco[0], images_dir, panoptic_dir=tmp_path / "pan")
    bad = segment_ids()
    bad[0, 0] = 12345
    write_panoptic(tmp_path / "pan", bad)
    with pytest.raises(DataError, match=r"a_pan.png of image 1 holds segment ids \[12345\]"):
        ds.annotations(0)
    write_panoptic(tmp_path / "pan", segment_ids()[:5])
    with pytest.raises(DataError, match="a_pan.png of image 1 is 5x12, but the image entry says"):
        ds.annotations(0)


def test_missing_extra_names_it(coco, monkeypatch) -> None:
    path, images_dir, _ = coco
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(DissectError, match=r"pip install 'torch-dissect\[coco\]'"):
        CocoConcepts(path, images_dir)


def edit(change):
    def apply(data: dict) -> dict:
        data = copy.deepcopy(data)
        change(data)
        return data
    return apply


def _ann(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


BAD_JSON = {
    "missing annotations": (edit(lambda d: d.pop("annotations")),
                            r"lacks the lists \['annotations'\]"),
    "unknown image": (edit(lambda d: _ann(d, 12).update(image_id=99)),
                      "annotation 12 has image_id 99, which 'images' does not list"),
    "unknown category": (edit(lambda d: _ann(d, 12).update(category_id=2)),
                         "annotation 12 has category_id 2, which 'categories' does not list"),
    "duplicate name": (edit(lambda d: d["categories"][1].update(name="dog")),
                       "the category name 'dog' is used by ids 18 and 1"),
    "missing key": (edit(lambda d: d["images"][1].pop("height")),
                    "image 3 lacks the key 'height'"),
    "rle size": (edit(lambda d: _ann(d, 20)["segmentation"].update(size=[8, 9])),
                 r"annotation 20 has an RLE of size \[8, 9\], but image 3 is 8x8"),
    "path out": (edit(lambda d: d["images"][0].update(file_name="../a.png")),
                 "file_name = '../a.png', expected a file name relative to the folder"),
    "odd polygon": (edit(lambda d: _ann(d, 12).update(segmentation=[[0, 0, 4, 0, 4]])),
                    "annotation 12 has a polygon that is not a flat list"),
}


@pytest.mark.parametrize("name", list(BAD_JSON))
def test_json_errors_name_the_file(coco, name) -> None:
    path, images_dir, _ = coco
    change, message = BAD_JSON[name]
    path.write_text(json.dumps(change(coco_json())))
    with pytest.raises(DataError, match=message) as info:
        CocoConcepts(path, images_dir)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"categories": []}, "keeps no COCO category"),
    ({"size": 0}, "size must be a positive int"),
    ({"size": (4, 4, 3)}, "size must be a positive int"),
    ({"images_dir": "/nonexistent/images"}, "images_dir /nonexistent/images does not exist"),
])
def test_bad_arguments(coco, kwargs, message) -> None:
    path, images_dir, _ = coco
    with pytest.raises(DataError, match=message):
        CocoConcepts(path, **{"images_dir": images_dir, **kwargs})


def test_unreadable_json(coco) -> None:
    path, images_dir, _ = coco
    path.write_text(json.dumps(coco_json())[:50])
    with pytest.raises(DataError, match=r"instances.json line 1 column \d+: not valid JSON"):
        CocoConcepts(path, images_dir)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match="instances.json"):
        CocoConcepts(path, images_dir)
    with pytest.raises(DataError, match="missing"):
        CocoConcepts(path.with_name("nope.json"), images_dir)


BAD_ITEMS = {  # errors found when the item is decoded
    "polygon out of the image": (
        edit(lambda d: _ann(d, 12).update(segmentation=[[0, 0, 40, 0, 40, 30]])), 0,
        r"annotation 12 \(image 7\): a polygon spans x 0..40, y 0..30, outside the 12x10"),
    "short uncompressed rle": (
        edit(lambda d: _ann(d, 20)["segmentation"].update(counts=[3, 2, 10])), 1,
        r"run lengths \(sum 15, smallest 2\) do not cover its 8x8 = 64 pixels"),
    "negative rle": (
        edit(lambda d: _ann(d, 20)["segmentation"].update(counts=[-1, 65])), 1,
        r"run lengths \(sum 64, smallest -1\)"),
    "compressed rle bad character": (
        edit(lambda d: _ann(d, 13)["segmentation"].update(counts="3~~")), 0,
        "compressed RLE string is corrupt"),
    "compressed rle cut inside a number": (
        edit(lambda d: _ann(d, 13)["segmentation"].update(counts="5o")), 0,
        "compressed RLE string is corrupt"),
    "compressed rle not ascii": (
        edit(lambda d: _ann(d, 13)["segmentation"].update(counts="5\u00e9")), 0,
        "compressed RLE string is corrupt"),
    "compressed rle cut short": (
        edit(lambda d: _ann(d, 13)["segmentation"].update(counts="51")), 0,
        r"run lengths \(sum 6, "),
}


@pytest.mark.parametrize("name", list(BAD_ITEMS))
def test_item_errors_name_the_file_and_annotation(coco, name) -> None:
    path, images_dir, _ = coco
    change, index, message = BAD_ITEMS[name]
    path.write_text(json.dumps(change(coco_json())))
    ds = CocoConcepts(path, images_dir)
    with pytest.raises(DataError, match=message) as info:
        ds.annotations(index)
    assert str(path) in str(info.value)


def test_image_file_errors(coco) -> None:
    path, images_dir, _ = coco
    ds = CocoConcepts(path, images_dir, size=8)
    (images_dir / "c.png").unlink()
    ds.annotations(2)  # the annotations need no image
    with pytest.raises(DataError, match=r"image 9 file .*c.png is missing"):
        ds[2]
    cv2.imwrite(str(images_dir / "c.png"), np.zeros((7, 9, 3), np.uint8))
    with pytest.raises(DataError, match="is 7x9, but the image entry says 6x9"):
        ds[2]


def test_annotation_cache_and_workers(coco, tmp_path: Path) -> None:
    from dissect.datasets.annotation_cache import annotation_batches, cache_file

    path, images_dir, _ = coco
    ds = CocoConcepts(path, images_dir, size=(6, 8))
    items = np.arange(3)
    direct = collate([ds.annotations(i) for i in items])
    for workers in (1, 0):  # decoded in a worker (the dataset pickles), then from the cache
        with annotation_batches(ds, items, 3, num_workers=workers, cache=tmp_path) as batches:
            (got,) = list(batches)
        for key in ("pixel_labels", "image_labels", "annotated", "index"):
            assert torch.equal(got[key], direct[key]), key
    assert cache_file(ds, tmp_path).is_file()
    assert cache_file(CocoConcepts(path, images_dir, size=(6, 9)), tmp_path) != cache_file(
        ds, tmp_path)
