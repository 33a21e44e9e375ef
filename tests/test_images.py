"""Image datasets: folders read exactly, the bundled photographs are real."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from dissect.datasets import ImageFolder, SampleImages, open_dataset, read_image
from dissect.errors import DataError


def test_image_folder_reads_exact_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "b.png"), rgb[..., ::-1])  # OpenCV writes BGR
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert len(ds) == 2 and ds[0]["name"] == "a.png"
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ds[1]["image"], expected, rtol=0, atol=0)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)


def test_image_errors(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "bad.png").write_text("garbage")
    with pytest.raises(DataError, match="cannot read image"):
        ImageFolder(tmp_path)[0]
    with pytest.raises(DataError, match="unknown data source"):
        open_dataset("no-such-thing")


def test_sample_images_are_real_photographs():
    ds = SampleImages()
    assert {"chelsea", "coffee", "astronaut", "rocket"} <= set(ds.names)
    cat = ds[ds.names.index("chelsea")]
    assert cat["image"].shape == (3, 300, 451)
    assert 0 <= cat["image"].min() < cat["image"].max() <= 1
    assert SampleImages(lambda x: x[:, :8, :8], names=["coffee"])[0]["image"].shape == (3, 8, 8)
    with pytest.raises(DataError, match="unavailable"):
        SampleImages(names=["unicorn"])


def test_resize_rgb_is_area_when_no_side_grows_else_linear():
    from dissect.datasets.images import resize_rgb

    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert resize_rgb(rgb, (40, 60)) is rgb
    for size, flag in [((20, 30), cv2.INTER_AREA), ((20, 60), cv2.INTER_AREA),
                       ((80, 30), cv2.INTER_LINEAR), ((50, 70), cv2.INTER_LINEAR)]:
        want = cv2.resize(rgb, size[::-1], interpolation=flag)
        assert np.array_equal(resize_rgb(rgb, size), want), size
