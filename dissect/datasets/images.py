"""Plain image datasets: a folder of images, and the real photographs that ship in packages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Raises
    ------
    DataError
        If the file is missing or not a readable image.
    """
    arr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if arr is None:
        raise DataError(f"cannot read image {path}: missing or not an image file")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _to_item(rgb: np.ndarray, index: int, transform: Callable | None, name: str) -> dict:
    image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    if transform is not None:
        image = transform(image)
    return {"image": image, "index": index, "name": name}


class ImageFolder(Dataset):
    """Every image file under a folder (recursively, sorted by path) as a dataset.

    Items are dicts ``{"image": (3, H, W) float tensor in [0, 1] (after transform), "index": int,
    "name": relative path}``.

    Parameters
    ----------
    root
        The folder.
    transform
        Applied to each ``(3, H, W)`` float image (e.g. the one from
        :func:`dissect.models.load_model`).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder of images")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        return _to_item(read_image(path), i, self.transform, str(path.relative_to(self.root)))


SKIMAGE_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "horse", "camera")
SKLEARN_NAMES = ("china.jpg", "flower.jpg")


def _sample_arrays() -> list[tuple[str, np.ndarray]]:
    out: list[tuple[str, np.ndarray]] = []
    try:
        import skimage.data as skd
    except ImportError:
        log.warning("scikit-image is not installed: SampleImages has no skimage photographs")
        skd = None
    for name in SKIMAGE_NAMES if skd is not None else ():
        try:
            arr = np.asarray(getattr(skd, name)())
        except Exception as exc:  # some need pooch / a network: skip them
            log.debug("skipping skimage.data.%s: %s", name, exc)
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        out.append((name, np.ascontiguousarray(arr[..., :3]).astype(np.uint8)))
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for fname, arr in zip(bunch.filenames, bunch.images, strict=True):
            out.append((Path(fname).stem, np.asarray(arr, dtype=np.uint8)))
    except Exception as exc:
        log.debug("scikit-learn sample images unavailable: %s", exc)
    return out


class SampleImages(Dataset):
    """The real photographs that ship with scikit-image and scikit-learn, offline.

    chelsea (a cat), coffee, astronaut, rocket, horse (a silhouette), camera, china and
    flower, skipping any that would need a network. Items are dicts like :class:`ImageFolder`'s;
    sizes differ, so give a ``transform`` that resizes before batching them.

    Parameters
    ----------
    transform
        Applied to each ``(3, H, W)`` float image in [0, 1].
    names
        Keep only these images (in this order).
    """

    def __init__(self, transform: Callable | None = None, names: list[str] | None = None) -> None:
        images = _sample_arrays()
        if names is not None:
            found = dict(images)
            missing = [n for n in names if n not in found]
            if missing:
                raise DataError(f"sample images {missing} unavailable; available: {list(found)}")
            images = [(n, found[n]) for n in names]
        if not images:
            raise DataError("no sample images: pip install scikit-image scikit-learn")
        self.names = [n for n, _ in images]
        self._arrays = [a for _, a in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self._arrays)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _to_item(self._arrays[i], i, self.transform, self.names[i])

