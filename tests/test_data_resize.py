"""resize_dataset / ResizedConcepts / `dissect data resize`: known answers for every pixel."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dissect import DataError
from dissect.cli import main
from dissect.datasets import Broden, SyntheticConcepts, write_broden
from dissect.datasets.resize import ResizedConcepts, resize_dataset


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    ds = SyntheticConcepts(6, size=48, seed=2, unannotated=0.4)
    return write_broden(ds, tmp_path_factory.mktemp("src") / "b", split="val")


def _uint8(image: torch.Tensor) -> np.ndarray:
    return (image.numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)


def _nearest_centers(plane: np.ndarray, s: int) -> np.ndarray:
    """The oracle: each output pixel takes the input label under its center (exact fractions)."""
    def under(n: int) -> list[int]:
        return [int(Fraction(2 * j + 1, 2) * Fraction(n, s)) for j in range(s)]

    return plane[np.ix_(under(plane.shape[0]), under(plane.shape[1]))]


@pytest.mark.parametrize("size", [64, 16, 45])
def test_resized_broden_has_known_pixels(source: Path, tmp_path: Path, size: int) -> None:
    src = Broden(source)
    out = resize_dataset(source, tmp_path / "r", size, progress=False)
    assert out == tmp_path / "r"
    back = Broden(out)
    s = size // 2
    assert back.categories == src.categories and back.concepts == src.concepts
    assert back.splits == src.splits == ["val"] * 6
    interpolation = cv2.INTER_AREA if size < 48 else cv2.INTER_LINEAR
    for i in range(len(src)):
        a, b = src[i], back[i]
        assert b["image"].shape == (3, size, size)
        want = cv2.resize(_uint8(a["image"]), (size, size), interpolation=interpolation)
        assert np.array_equal(_uint8(b["image"]), want)
        assert b["pixel_labels"].shape == (a["pixel_labels"].shape[0], s, s)
        for plane, got in zip(a["pixel_labels"].numpy(), b["pixel_labels"].numpy(), strict=True):
            assert np.array_equal(got, _nearest_centers(plane, s))
            if size != 45:  # 24 -> 22: OpenCV breaks the two ties (centers on a boundary) down
                exact = cv2.resize(plane.astype(np.uint16), (s, s),
                                   interpolation=cv2.INTER_NEAREST_EXACT)
                assert np.array_equal(got, exact)
        assert torch.equal(a["image_labels"], b["image_labels"])
        assert torch.equal(a["annotated"], b["annotated"])
        assert back.item_categories(i) == src.item_categories(i)


def test_odd_size_gives_floor_half_planes(source: Path) -> None:
    ds = ResizedConcepts(Broden(source), 45)
    item = ds[0]
    assert item["image"].shape == (3, 45, 45)
    assert item["pixel_labels"].shape[1:] == (22, 22)  # as broden1_227 has 113 = 227 // 2


def test_nearest_is_center_aligned_on_a_hand_made_plane() -> None:
    ds = ResizedConcepts(SyntheticConcepts(1, size=16), 4)  # planes 4x4 -> 2x2
    plane = np.arange(16).reshape(1, 4, 4)
    # output pixel (y, x) reads input (2y + 1, 2x + 1): centers 0.5 * 4/2 = 1.0 -> index 1, 3
    assert ds.resize_planes(plane).tolist() == [[[5, 7], [13, 15]]]
    up = ResizedConcepts(SyntheticConcepts(1, size=16), 16).resize_planes(np.array([[[1, 2],
                                                                                    [3, 4]]]))
    assert up[0].tolist() == [[1] * 4 + [2] * 4] * 4 + [[3] * 4 + [4] * 4] * 4


def test_transform_of_the_source_is_ignored_and_own_transform_applies() -> None:
    inner = SyntheticConcepts(2, size=32, seed=1)
    inner.transform = lambda x: x * 100  # would break the [0, 1] check if used
    ds = ResizedConcepts(inner, 16)
    assert inner.transform is not None  # the caller's dataset is left as it was
    plain = ds[1]["image"]
    assert float(plain.max()) <= 1.0
    ds.transform = lambda x: x * 2
    assert torch.equal(ds[1]["image"], plain * 2)


def test_errors(source: Path, tmp_path: Path) -> None:
    for bad in (1, 0, -4, 2.5, True, 16385):
        with pytest.raises(DataError, match="size must be an integer from 2"):
            resize_dataset(source, tmp_path / "x", bad)
    with pytest.raises(DataError, match="neither a Broden's index.csv nor"):
        resize_dataset(tmp_path, tmp_path / "x", 32)
    with pytest.raises(DataError, match="is the source itself"):
        resize_dataset(source, source, 32)
    with pytest.raises(DataError, match="not a concept dataset"):
        resize_dataset(object(), tmp_path / "x", 32)
    resize_dataset(source, tmp_path / "once", 32, progress=False)
    with pytest.raises(DataError, match="overwrite=True"):
        resize_dataset(source, tmp_path / "once", 32, progress=False)
    resize_dataset(source, tmp_path / "once", 20, overwrite=True, progress=False)
    assert Broden(tmp_path / "once")[0]["image"].shape == (3, 20, 20)


def test_a_dataset_object_and_jpeg(tmp_path: Path) -> None:
    ds = SyntheticConcepts(3, size=32, seed=7)
    back = Broden(resize_dataset(ds, tmp_path, 24, image_format="jpg", progress=False))
    assert back.filename(0).suffix == ".jpg"
    assert back.splits == ["train"] * 3
    item = back[2]
    assert item["image"].shape == (3, 24, 24) and item["pixel_labels"].shape[1:] == (12, 12)
    assert torch.equal(item["pixel_labels"], ResizedConcepts(ds, 24)[2]["pixel_labels"])


def test_converts_a_segmentation_folder(tmp_path: Path) -> None:
    from dissect.datasets.segmentation_folder import SegmentationFolder

    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.csv").write_text("number,name,category\n1,sky,object\n2,road,object\n")
    rng = np.random.default_rng(0)
    masks = []
    for k in range(2):
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        mask = np.zeros((8, 8), dtype=np.uint8)
        mask[: 4 + k] = 1
        mask[6:] = 2
        masks.append(mask)
        cv2.imwrite(str(root / "images" / f"im{k}.png"), image)
        cv2.imwrite(str(root / "masks" / f"im{k}.object.png"), mask)
    out = resize_dataset(root, tmp_path / "r", 32, progress=False)
    back, seg = Broden(out), SegmentationFolder(root)
    assert len(back) == 2 and [c.name for c in back.concepts] == ["sky", "road"]
    for k in range(2):
        got = back[k]["pixel_labels"].numpy()
        assert got.shape == (1, 16, 16)
        plane = seg[k]["pixel_labels"][0].numpy()
        assert np.array_equal(got[0], _nearest_centers(plane, 16))


def test_cli(source: Path, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "small"
    assert main(["data", "resize", str(source), str(dst), "--size", "32", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(dst.resolve())
    assert Broden(dst)[0]["pixel_labels"].shape[1:] == (16, 16)
    assert main(["data", "resize", str(source), str(dst), "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dissect data") and "--overwrite" in err and err.count("\n") == 1
    assert main(["data", "resize", str(source), str(dst), "--size", "20", "--overwrite",
                  "--image-format", "jpg"]) == 0
    assert Broden(dst).filename(0).suffix == ".jpg"
    assert main(["data", "resize", str(tmp_path / "none"), str(tmp_path / "o"),
                 "--size", "8"]) == 1
    assert "index.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["data", "resize", str(source), str(tmp_path / "o"), "--size", "1"])
    assert exc.value.code == 2
    assert "at least 2" in capsys.readouterr().err
