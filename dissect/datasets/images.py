"""Plain image datasets: a folder of images, and the real photographs that ship in packages.

Also the one careful way the datasets read a data file (:func:`read_file_bytes`,
:func:`read_utf8_text`, :func:`header_size`, :func:`decode_image`): a file is opened once and
read whole (a directory, a pipe or a device where a file should be is refused, never waited on),
text must be UTF-8, the size that a PNG or JPEG header claims is checked before anything is
decoded or allocated, and every failure, OpenCV's included, is a :class:`~dissect.DataError`
naming the file.
"""

from __future__ import annotations

import codecs
import logging
import os
import stat
import struct
import zlib
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

MAX_IMAGE_PIXELS = 1 << 28
"""Largest image (height x width) read: 16384 x 16384, 768 MiB decoded as RGB. A header that
claims more is refused before decoding (OpenCV itself stops at 2**30)."""

MAX_FILE_BYTES = 1 << 30
"""Largest file read (1 GiB); a larger one is refused before it is read."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments
_JPEG_SOF = frozenset((*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                       *range(0xCD, 0xD0)))


def shown(path: str | os.PathLike, limit: int = 240) -> str:
    """``path`` for a message: shortened in the middle when longer than ``limit`` characters."""
    text = os.fspath(path)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 60]}...{text[-40:]} ({len(text)} characters)"


def read_file_bytes(path: str | os.PathLike, what: str, missing_hint: str = "") -> bytes:
    """The bytes of a regular file, read once.

    ``what`` names the file in messages (e.g. ``"label PNG /data/x.png"``); ``missing_hint`` is
    added to the message when the file does not exist.

    Raises
    ------
    DataError
        The file is missing, is a directory or something else than
        a regular file (a pipe or a device is never read), is larger than
        :data:`MAX_FILE_BYTES`, or the OS refuses it (the OS error text is given: permission
        denied, file name too long, ...).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError(f"{what} is missing{missing_hint}") from None
    except IsADirectoryError:  # Windows and some file systems refuse to open a directory
        raise DataError(f"{what} is a directory, not a file") from None
    except OSError as exc:
        raise DataError(
            f"{what} cannot be opened: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:  # a NUL character in the path
        raise DataError(f"{what} is not a valid path: {exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise DataError(f"{what} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise DataError(
                f"{what} is not a regular file (a pipe, socket or device); "
                "replace it with the file itself"
            )
        if info.st_size > MAX_FILE_BYTES:
            raise DataError(
                f"{what} is {info.st_size} bytes, more than the "
                f"{MAX_FILE_BYTES} bytes read from one file; is it the right file?"
            )
        chunks = []
        size, want = 0, info.st_size + 1
        while True:  # one read in the usual case: all the bytes that fstat promised
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise DataError(f"{what} grew beyond {MAX_FILE_BYTES} bytes")
            if size == info.st_size:
                break
            want = max(info.st_size + 1 - size, 1 << 16)
    except OSError as exc:
        raise DataError(f"{what} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_utf8_text(
    path: str | os.PathLike, what: str, missing_hint: str = "", rule: str = "expected UTF-8"
) -> str:
    """The text of a UTF-8 file, a leading byte-order mark dropped (:func:`read_file_bytes`).

    Raises
    ------
    DataError
        As :func:`read_file_bytes`, and for UTF-16/32 text, NUL bytes or bytes that are not
        UTF-8, naming ``what``, the line and ``rule`` (what the file should be).
    """
    data = read_file_bytes(path, what, missing_hint)
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            f"{what} is UTF-16 or UTF-32 text (it starts with a byte-order mark); {rule}: "
            "save it again as UTF-8"
        )
    at = data.find(b"\0", start)
    if at >= 0:
        raise DataError(f"{what} line {_line_of(data, at)}: a NUL byte: not a text file, or "
                        f"UTF-16 text; {rule}: save it again as UTF-8")
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = start + exc.start
        raise DataError(f"{what} line {_line_of(data, at)}: not UTF-8 text (byte 0x{data[at]:02x} "
                        f"at offset {at}); {rule}: save it again as UTF-8") from None


def _jpeg_size(data: bytes, what: str) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame segment, walking the segments after SOI; a
    JPEG cut short (no end-of-image marker after its coded data) is refused, as libjpeg would
    fill the missing rows with gray without a word."""
    i, n, size = 2, len(data), None
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            i += 2
            continue
        if marker == 0xD9:  # end of image before any coded data
            break
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker == 0xDA:  # start of scan: coded data (no 0xFFD9 inside) up to end of image
            if size is not None and data.find(b"\xff\xd9", i + 2 + length) < 0:
                raise DataError(f"{what} is a truncated JPEG: no end-of-image marker after "
                                "its image data")
            break
        if marker in _JPEG_SOF and size is None:
            if length < 8 or i + 9 > n:
                break
            size = struct.unpack_from(">HH", data, i + 5)
            if 0 in size:
                raise DataError(f"{what} is a JPEG with a {size[0]}x{size[1]} frame header")
        if length < 2:
            break
        i += 2 + length
    else:
        size = None  # cut before its coded data
    if size is None:
        raise DataError(f"{what} is a corrupt or truncated JPEG: no frame header with its size, "
                        "or no image data")
    return size


def header_size(data: bytes, what: str = "image") -> tuple[int, int] | None:
    """``(height, width)`` that a PNG or JPEG file's header claims; ``None`` for other formats.

    Reads only the first bytes of a PNG (its IHDR chunk, CRC checked) and the segment headers
    of a JPEG, so a file is checked before it is decoded.

    Raises
    ------
    DataError
        If the file is empty, or a PNG/JPEG whose header is corrupt or truncated (``what``
        names it in the message).
    """
    if not data:
        raise DataError(f"{what} is an empty file")
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise DataError(f"{what} is a corrupt or truncated PNG: no IHDR header chunk")
        if zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]:
            raise DataError(f"{what} is a corrupt PNG: its IHDR header chunk fails its CRC")
        width, height = struct.unpack_from(">II", data, 16)
        if not 0 < width < 1 << 31 or not 0 < height < 1 << 31:
            raise DataError(f"{what} is a corrupt PNG: its header says {height}x{width} pixels")
        return height, width
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data, what)
    return None


def check_pixels(height: int, width: int, what: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an image of more than ``limit`` pixels (before it is decoded)."""
    if height * width > limit:
        raise DataError(
            f"{what} claims {height}x{width} = {height * width} pixels, more than the "
            f"{limit} read from one image; the file is corrupt or not meant for this"
        )


def decode_image(data: bytes, flags: int, what: str = "image") -> np.ndarray:
    """Decode file bytes with ``cv2.imdecode``; OpenCV's refusals become a DataError.

    The caller checks the size first (:func:`header_size`, :func:`check_pixels`).
    """
    try:
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoding failed"
        raise DataError(f"cannot read {what}: OpenCV refuses it: {reason}") from None
    if arr is None:
        raise DataError(
            f"cannot read {what}: not a readable image (corrupt, truncated, or in a format "
            "OpenCV does not decode)"
        )
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Raises
    ------
    DataError
        If the file is missing, not a regular file, not a readable image, or claims more than
        :data:`MAX_IMAGE_PIXELS` pixels.
    """
    what = f"image {shown(path)}"
    data = read_file_bytes(path, what)
    size = header_size(data, what)
    if size is not None:
        check_pixels(*size, what)
    return cv2.cvtColor(decode_image(data, cv2.IMREAD_COLOR, what), cv2.COLOR_BGR2RGB)


def nearest_centers(n: int, s: int) -> np.ndarray:
    """For each of ``s`` output pixels along an axis of ``n`` input pixels, the input pixel
    under its center: ``floor((2 j + 1) n / (2 s))``, in exact integer arithmetic (a center
    exactly on the boundary of two pixels takes the second).

    How label planes and masks are resized (``plane[np.ix_(rows, cols)]``): never a blend of
    labels, never shifted by half a pixel. ``cv2.INTER_NEAREST_EXACT`` intends the same but
    its fixed-point arithmetic breaks exact ties the other way (24 -> 22 pixels: index 5 where
    the center is exactly 6.0) and can pick a neighbour on planes thousands of pixels wide.
    """
    return (2 * np.arange(s, dtype=np.int64) + 1) * n // (2 * s)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image at ``size = (h, w)``, the one rule of every concept dataset.

    ``cv2.INTER_AREA`` when no side grows (each output pixel averages the input pixels it
    covers: no aliasing), ``cv2.INTER_LINEAR`` when a side grows; the array itself when it
    already has that size.
    """
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    grows = h > rgb.shape[0] or w > rgb.shape[1]
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR if grows else cv2.INTER_AREA)


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

