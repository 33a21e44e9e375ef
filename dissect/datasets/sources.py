"""Resolve a data source name ("synthetic:N", "broden:PATH", a folder, "samples") to a dataset.

:func:`open_dataset` turns a spec into a dataset; :func:`resolve_data` is what every public
function taking data calls first, so that Python and the CLI accept the same specs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import DataError
from .broden import Broden
from .images import ImageFolder, SampleImages
from .segmentation_folder import SegmentationFolder
from .synthetic import SyntheticConcepts

__all__ = ["ACCEPTED_SPECS", "open_dataset", "resolve_data"]

DEFAULT_SYNTHETIC_SIZE = 1000

#: The accepted data-source specs, as named in error messages.
ACCEPTED_SPECS = ("'synthetic' or 'synthetic:N', 'broden:PATH', a Broden folder (with an "
                  "index.csv), a segmentation folder (with a labels.csv), 'samples' or a "
                  "folder of images")


def open_dataset(spec: str, transform: Callable | None = None) -> Dataset:
    """Resolve a data source name to a dataset.

    Parameters
    ----------
    spec
        ``"synthetic"`` or ``"synthetic:N"`` for :class:`SyntheticConcepts` (N images, default
        1000, 112 px, seed 0); ``"broden:PATH"`` or a folder holding an ``index.csv`` for
        :class:`Broden`; a folder holding a ``labels.csv`` (and no ``index.csv``) for
        :class:`SegmentationFolder`; ``"samples"`` for :class:`SampleImages` (the bundled
        photographs); any other folder for :class:`ImageFolder`.
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
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"bad data source {spec!r}: give {ACCEPTED_SPECS}")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.partition(":")[2] or str(DEFAULT_SYNTHETIC_SIZE)
        if not count.isdigit():
            raise DataError(f"bad data source {spec!r}: write 'synthetic' or 'synthetic:N' "
                            f"(N images); the accepted forms are {ACCEPTED_SPECS}")
        return SyntheticConcepts(int(count), transform=transform)
    if spec.startswith("broden:"):
        return Broden(spec.partition(":")[2], transform=transform)
    if (Path(spec) / "index.csv").is_file():
        return Broden(spec, transform=transform)
    if (Path(spec) / "labels.csv").is_file():
        return SegmentationFolder(spec, transform=transform)
    if spec == "samples":
        return SampleImages(transform)
    if Path(spec).is_dir():
        return ImageFolder(spec, transform)
    raise DataError(
        f"unknown data source {spec!r} (not a spec, and no such folder): give {ACCEPTED_SPECS}; "
        "or pass a Dataset object"
    )


def resolve_data(data: Any, transform: Callable | None = None) -> tuple[Any, str | None]:
    """The one resolver of the ``data`` argument of every public function that takes data.

    A ``str`` or :class:`os.PathLike` is a data-source spec, opened by :func:`open_dataset`
    (the same specs as the CLI's ``--data``); anything else (a ``Dataset``, a ``DataLoader``,
    a tensor) is returned as it is, for the caller to check.

    Parameters
    ----------
    data
        A spec (``"synthetic:200"``, ``"samples"``, ``"broden:PATH"``, a folder, a
        :class:`~pathlib.Path`) or a data object.
    transform
        Applied to each image of a dataset opened from a spec (ignored otherwise). ``None``
        (default) leaves images as the dataset gives them: ``(3, H, W)`` float tensors in
        [0, 1] for :class:`SyntheticConcepts`, :class:`SampleImages` and image folders. The
        CLI applies the model's preprocessing here; a Python caller who needs it passes a
        transform, or a dataset object built with one.

    Returns
    -------
    tuple
        ``(dataset, spec)``: the dataset (``data`` itself when it is not a spec) and the spec
        string to record (e.g. as a store's ``dataset`` attribute), or ``None`` when ``data``
        was not a spec.

    Raises
    ------
    DataError
        If ``data`` is a string or path that names no usable source; the message names the
        accepted forms.
    """
    if isinstance(data, (str, os.PathLike)):
        spec = os.fspath(data)
        if isinstance(spec, bytes):
            raise DataError(f"bad data source {data!r}: give a str spec ({ACCEPTED_SPECS})")
        return open_dataset(spec, transform), spec
    return data, None
