"""Resolve a data source name ("synthetic:N", "broden:PATH", a folder, "samples") to a dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .broden import Broden
from .images import ImageFolder, SampleImages
from .synthetic import SyntheticConcepts

DEFAULT_SYNTHETIC_SIZE = 1000


def open_dataset(spec: str, transform: Callable | None = None) -> Dataset:
    """Resolve a data source name to a dataset.

    Parameters
    ----------
    spec
        ``"synthetic"`` or ``"synthetic:N"`` for :class:`SyntheticConcepts` (N images, default
        1000, 112 px, seed 0); ``"broden:PATH"`` or a folder holding an ``index.csv`` for
        :class:`Broden`; ``"samples"`` for :class:`SampleImages` (the bundled photographs); any
        other folder for :class:`ImageFolder`.
    transform
        Applied to each image.

    Returns
    -------
    torch.utils.data.Dataset

    Raises
    ------
    DataError
        If the spec names no usable source.
    """
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.partition(":")[2] or str(DEFAULT_SYNTHETIC_SIZE)
        if not count.isdigit():
            raise DataError(f"bad data source {spec!r}: write 'synthetic' or 'synthetic:N'")
        return SyntheticConcepts(int(count), transform=transform)
    if spec.startswith("broden:"):
        return Broden(spec.partition(":")[2], transform=transform)
    if (Path(spec) / "index.csv").is_file():
        return Broden(spec, transform=transform)
    if spec == "samples":
        return SampleImages(transform)
    if Path(spec).is_dir():
        return ImageFolder(spec, transform)
    raise DataError(
        f"unknown data source {spec!r}: give synthetic[:N], broden:PATH, samples or a folder "
        "of images"
    )
