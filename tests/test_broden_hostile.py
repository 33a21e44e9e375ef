"""Hostile Broden folders: every malformed input is a DataError naming the file (and line).

First one regression test per defect of the issue "Nothing lost, nothing raw" (its Broden part),
then a seeded fuzz test: a few thousand single mutations of a small Broden (byte flips,
truncations, huge numbers and fields, other encodings, paths out of the folder, duplicate
columns, directories, pipes and devices in place of files, PNG and JPEG headers claiming huge
images, ...), each opened and read in worker processes whose address space and time per case
are bounded. Every outcome must be success or a DissectError whose message names a file of the
case. Run one case by hand with ``python tests/test_broden_hostile.py --case SEED``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

import dissect.datasets.images as images_module
from dissect import DataError, DissectError
from dissect.datasets import Broden, SyntheticConcepts, read_image, read_label_png, write_broden

log = logging.getLogger(__name__)
CAT_DIR = "syntheticconcepts"  # write_broden's folder under images/
INDEX_HEADER = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "scene",
                "texture"]


# ---------------------------------------------------------------- helpers


def make_base(root: Path, image_format: str = "png") -> Path:
    """A small Broden: 8 images of 32 px, 16 px label planes (4 per image), 5 categories."""
    return write_broden(SyntheticConcepts(8, size=32, seed=0), root, image_format=image_format)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("pristine") / "broden")


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "broden"))


def read_all(root: Path) -> Broden:
    ds = Broden(root)
    for i in range(len(ds)):
        ds[i]
    return ds


def rewrite(path: Path, data: bytes) -> None:
    """Write a new file (never in place: fuzz cases share unmutated files as hard links)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    path.unlink(missing_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def set_cell(path: Path, line: int, column: str, value: str) -> None:
    """Set a cell of a CSV file (``line`` counts from 1, the header)."""
    rows = csv_rows(path)
    rows[line - 1][rows[0].index(column)] = value
    write_rows(path, rows)


def png_claiming(data: bytes, height: int, width: int, fix_crc: bool = True) -> bytes:
    """PNG bytes whose IHDR says ``height x width`` (CRC fixed unless asked otherwise)."""
    out = bytearray(data)
    out[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def jpeg_claiming(data: bytes, height: int, width: int) -> bytes:
    """JPEG bytes whose first start-of-frame segment says ``height x width``."""
    out, at = bytearray(data), 2
    while out[at + 1] not in (0xC0, 0xC1, 0xC2):  # walk the segments to the frame header
        at += 2 + struct.unpack_from(">H", out, at + 2)[0]
    out[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def label_png(name: int) -> str:
    return f"{CAT_DIR}/{name:06d}_color.png"


def raises_naming(fn, file: Path | str, *patterns: str, line: int | None = None) -> str:
    """Call ``fn``; it must raise DataError naming ``file`` (and ``line``) and the patterns."""
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert str(file) in message, message
    if line is not None:
        assert f"{file} line {line}" in message, message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


# ---------------------------------------------------------------- encodings, CSV structure


def test_non_utf8_csv_names_file_and_line(root: Path) -> None:
    path = root / "label.csv"
    data = path.read_bytes().replace(b"black", b"schw\xe4rz", 1)  # latin-1 a-umlaut
    rewrite(path, data)
    raises_naming(lambda: Broden(root), path, r"not UTF-8 text \(byte 0xe4", "save it again",
                  line=2)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_and_utf32_with_bom_are_refused(root: Path, encoding: str) -> None:
    path = root / "index.csv"
    rewrite(path, path.read_text(encoding="utf-8").encode(encoding))
    raises_naming(lambda: Broden(root), path, "UTF-16 or UTF-32", "UTF-8")


def test_utf16_without_bom_is_refused(root: Path) -> None:
    path = root / "category.csv"
    rewrite(path, path.read_text(encoding="utf-8").encode("utf-16-le"))
    raises_naming(lambda: Broden(root), path, "NUL byte", line=1)


def test_utf8_with_bom_is_read(root: Path, pristine: Path) -> None:
    for name in ("index.csv", "label.csv", "category.csv", "c_color.csv"):
        rewrite(root / name, b"\xef\xbb\xbf" + (root / name).read_bytes())
    ds, ref = read_all(root), Broden(pristine)
    assert len(ds) == len(ref) and ds.concepts == ref.concepts
    assert ds[3]["image_labels"].tolist() == ref[3]["image_labels"].tolist()


def test_field_over_csv_limit(root: Path) -> None:
    path = root / "index.csv"
    set_cell(path, 3, "scene", "1" * 131_073)
    raises_naming(lambda: Broden(root), path, "longer than 131072 characters", line=3)


def test_unterminated_quote_swallowing_the_file(root: Path) -> None:
    path = root / "label.csv"
    rewrite(path, path.read_bytes().replace(b"black", b'"black', 1) + b"x" * 140_000 + b"\n")
    raises_naming(lambda: Broden(root), path, "longer than")


@pytest.mark.parametrize("cut", [0, 5, 30, 54])
def test_index_cut_inside_its_header(root: Path, cut: int) -> None:
    path = root / "index.csv"
    rewrite(path, path.read_bytes()[:cut])
    raises_naming(lambda: Broden(root), path, "empty|ends inside this line")


def test_index_with_header_only_is_refused(root: Path) -> None:
    path = root / "index.csv"
    rewrite(path, path.read_bytes().split(b"\n")[0] + b"\n")
    raises_naming(lambda: Broden(root), path, "lists no images")


def test_index_header_cut_at_a_line_break_lacks_columns(root: Path) -> None:
    path = root / "index.csv"
    text = path.read_text()
    rewrite(path, (text[: text.index(",scene")] + "\n" + text.split("\n", 1)[1]).encode())
    raises_naming(lambda: Broden(root), path, r"lacks the columns \['scene', 'texture'\]",
                  line=1)


@pytest.mark.parametrize(("name", "cut"), [("index.csv", "26,3"), ("c_object.csv", "0.")])
def test_csv_cut_inside_its_last_line(root: Path, name: str, cut: str) -> None:
    """A cut inside the last field (texture '31' -> '3', a coverage '0.0' -> '0.') would
    read as valid data: every Broden writer ends each line with a line break, so a file that
    does not is refused."""
    path = root / name
    data = path.read_bytes()
    rewrite(path, data[: data.rindex(cut.encode()) + len(cut)])
    lines = data.count(b"\n")
    raises_naming(lambda: Broden(root), path, "ends inside this line", "end it with a line break",
                  line=lines)


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "c_part.csv"])
def test_duplicate_column_names(root: Path, name: str) -> None:
    path = root / name
    rows = csv_rows(path)
    rows[0][-1] = rows[0][1]  # the last column renamed like the second one: the last would win
    write_rows(path, rows)
    raises_naming(lambda: Broden(root), path, rf"\['{rows[0][1]}'\] more than once", line=1)


def test_row_with_wrong_number_of_fields(root: Path) -> None:
    path = root / "c_object.csv"
    rewrite(path, path.read_bytes() + b"99,7\n")
    raises_naming(lambda: Broden(root), path, "malformed row with 2 fields, expected 5")


@pytest.mark.parametrize(
    ("name", "line", "column", "value", "pattern"),
    [
        ("index.csv", 4, "ih", "\u0663\u0662", r"column 'ih'"),  # Arabic-Indic digits
        ("index.csv", 2, "iw", "3.2e1", r"column 'iw'"),
        ("index.csv", 5, "sh", "9" * 5000, r"column 'sh' is '9999.*5000 characters"),
        ("index.csv", 9, "sw", "-16", r"column 'sw'"),
        ("label.csv", 3, "number", "2.0", r"column 'number'"),
        ("label.csv", 3, "frequency", "1e999", r"column 'frequency'"),
        ("label.csv", 3, "category", "color(" + "9" * 5000 + ")", r"malformed row: category"),
        ("c_color.csv", 2, "code", "9" * 5000, r"column 'code'"),
        ("c_color.csv", 2, "coverage", "nan", r"column 'coverage'"),
    ],
)
def test_non_numeric_or_out_of_range_numbers(root, name, line, column, value, pattern) -> None:
    path = root / name
    set_cell(path, line, column, value)
    raises_naming(lambda: Broden(root), path, pattern, line=line)


# ---------------------------------------------------------------- label numbers


@pytest.mark.parametrize("number", ["1000000000000", "1000000000", "65536", "9" * 5000])
def test_label_number_beyond_png_encoding_in_label_csv(root: Path, number: str) -> None:
    path = root / "label.csv"
    set_cell(path, 2, "number", number)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        raises_naming(lambda: Broden(root), path, r"expected an integer in \[0, 65535\]", line=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 50 << 20  # no table sized by the number


def test_label_number_65535_is_the_largest(root: Path) -> None:
    path = root / "label.csv"
    rows = csv_rows(path)
    rows.append(["65535", "top", "color(0)", "0", "0", ""])
    write_rows(path, rows)
    ds = read_all(root)
    assert 65535 in ds.labels


@pytest.mark.parametrize("number", ["1000000000000", "65536", "9" * 5000])
def test_label_number_beyond_png_encoding_in_c_file(root: Path, number: str) -> None:
    set_cell(root / "c_color.csv", 3, "number", number)
    raises_naming(lambda: Broden(root), root / "c_color.csv", r"column 'number'", line=3)


@pytest.mark.parametrize("number", ["1000000000000", "65536", "9" * 5000])
def test_label_number_beyond_png_encoding_in_index(root: Path, number: str) -> None:
    set_cell(root / "index.csv", 3, "scene", number)
    raises_naming(lambda: Broden(root), root / "index.csv",
                  rf"scene label {number[:20]} is not in label.csv", line=3)


# ---------------------------------------------------------------- sizes and headers


@pytest.mark.parametrize("size", ["4294967296", "1000000000000", "65536"])
def test_huge_sh_sw_refused_before_allocating(root: Path, size: str) -> None:
    path = root / "index.csv"
    set_cell(path, 2, "sh", size)
    set_cell(path, 2, "sw", size)
    raises_naming(lambda: Broden(root), path, r"column 'sh'|more than", line=2)


def test_large_sh_sw_disagreeing_with_png_checked_before_decoding(root, monkeypatch) -> None:
    path = root / "index.csv"
    set_cell(path, 2, "sh", "8000")  # 8000 x 8000 x 4 planes x 8 bytes: 2 GB if allocated
    set_cell(path, 2, "sw", "8000")
    ds = Broden(root)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the header was checked")

    monkeypatch.setattr(images_module.cv2, "imdecode", no_decoding)
    tracemalloc.start()
    try:
        raises_naming(lambda: ds.annotations(0), path, r"color label PNG .*000000_color.png "
                      r"is 16x16, but the row says sh x sw = 8000x8000", line=2)
        assert tracemalloc.get_traced_memory()[1] < 10 << 20
    finally:
        tracemalloc.stop()


def test_images_larger_than_a_sane_bound(root: Path) -> None:
    path = root / "index.csv"
    set_cell(path, 3, "ih", "100000")
    set_cell(path, 3, "iw", "100000")
    raises_naming(lambda: Broden(root), path, r"ih x iw = 100000x100000 .* is more than", line=3)


@pytest.mark.parametrize(("height", "width"), [(1 << 16, 1 << 16), (2**31 - 1, 2**31 - 1),
                                               (1, 2**30 + 1)])
def test_png_header_claiming_huge_label_plane(root: Path, height: int, width: int) -> None:
    png = root / "images" / label_png(2)
    rewrite(png, png_claiming(png.read_bytes(), height, width))
    ds = Broden(root)
    raises_naming(lambda: ds[2], root / "index.csv", rf"{png}.* is {height}x{width}, but the "
                  r"row says sh x sw = 16x16", line=4)
    raises_naming(lambda: read_label_png(png), png, "claims .* pixels, more than")


@pytest.mark.parametrize(("height", "width"), [(1 << 16, 1 << 16), (2**31 - 1, 3)])
def test_png_header_claiming_huge_image(root: Path, height: int, width: int) -> None:
    png = root / "images" / CAT_DIR / "000005.png"
    rewrite(png, png_claiming(png.read_bytes(), height, width))
    raises_naming(lambda: Broden(root)[5], root / "index.csv", rf"image {png} is "
                  rf"{height}x{width}, but the row says ih x iw = 32x32", line=7)
    raises_naming(lambda: read_image(png), png, "claims .* pixels")


def test_png_header_with_bad_crc_or_zero_size(root: Path) -> None:
    png = root / "images" / label_png(1)
    rewrite(png, png_claiming(png.read_bytes(), 1 << 20, 1 << 20, fix_crc=False))
    raises_naming(lambda: Broden(root)[1], png, "IHDR header chunk fails its CRC")
    rewrite(png, png_claiming(png.read_bytes(), 0, 16))
    raises_naming(lambda: Broden(root)[1], png, "corrupt PNG: its header says 0x16")


def test_jpeg_header_claiming_huge_image(tmp_path: Path) -> None:
    root = make_base(tmp_path / "jpg", image_format="jpg")
    jpg = root / "images" / CAT_DIR / "000003.jpg"
    rewrite(jpg, jpeg_claiming(jpg.read_bytes(), 65535, 65535))
    raises_naming(lambda: Broden(root)[3], root / "index.csv",
                  rf"image {jpg} is 65535x65535, but the row says ih x iw = 32x32", line=5)
    raises_naming(lambda: read_image(jpg), jpg, "claims 65535x65535")
    rewrite(jpg, jpg.read_bytes()[:20])  # cut before its frame header
    raises_naming(lambda: Broden(root)[3], jpg, "corrupt or truncated JPEG")


@pytest.mark.parametrize("cut", [-1, -2, -100, 0.5])
def test_truncated_jpeg_image(tmp_path: Path, cut: float) -> None:
    """libjpeg decodes a JPEG cut short, gray where data are missing: refused instead."""
    root = make_base(tmp_path / "jpg", image_format="jpg")
    jpg = root / "images" / CAT_DIR / "000002.jpg"
    data = jpg.read_bytes()
    rewrite(jpg, data[: int(cut * len(data)) if cut == 0.5 else cut])
    raises_naming(lambda: Broden(root)[2], jpg, "truncated JPEG")
    raises_naming(lambda: read_image(jpg), jpg, "truncated JPEG")


@pytest.mark.parametrize("cut", [0, 10, 30, 60, -12])
def test_truncated_label_png(root: Path, cut: int) -> None:
    png = root / "images" / label_png(6)
    rewrite(png, png.read_bytes()[:cut])
    raises_naming(lambda: Broden(root)[6], png, "not a PNG|corrupt|not a readable image")


def test_corrupt_label_png(root: Path) -> None:
    png = root / "images" / label_png(6)
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the compressed pixels: fails its CRC
    rewrite(png, bytes(data))
    raises_naming(lambda: Broden(root)[6], png, "not a readable image")


def test_label_plane_that_is_not_a_png(root: Path) -> None:
    png = root / "images" / label_png(0)
    ok, jpeg = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    rewrite(png, jpeg.tobytes())
    raises_naming(lambda: Broden(root)[0], png, "is not a PNG file")


# ---------------------------------------------------------------- paths and files


@pytest.mark.parametrize(
    ("column", "value", "pattern"),
    [
        ("image", "../broden/images/syntheticconcepts/000001.png", "climbs out"),
        ("image", f"{CAT_DIR}/../../index.csv", "climbs out"),
        ("object", "..\\..\\secret.png", "climbs out"),
        ("color", "ABSOLUTE", "is an absolute path"),
        ("image", "/etc/passwd", "is an absolute path"),
        ("part", "C:\\broden\\x.png", "is an absolute path"),
    ],
)
def test_paths_outside_the_root_are_refused(root, column, value, pattern) -> None:
    if value == "ABSOLUTE":  # a real file: reading it would silently succeed
        value = str(root / "images" / label_png(1))
    path = root / "index.csv"
    set_cell(path, 2, column, value)
    raises_naming(lambda: Broden(root), path, pattern, "must stay inside", line=2)


def test_over_long_file_names(root: Path) -> None:
    path = root / "index.csv"
    set_cell(path, 3, "object", "x" * 300 + ".png")
    ds = Broden(root)
    message = raises_naming(lambda: ds[1], path, "cannot be opened: File name too long", line=3)
    assert len(message) < 600  # the path is shortened in the message
    rows = csv_rows(root / "category.csv")
    rows[2][0] = "y" * 300  # c_yyy...y.csv
    write_rows(root / "category.csv", rows)
    with pytest.raises(DataError, match="File name too long|is missing"):
        Broden(root)


def test_bad_category_names(root: Path) -> None:
    for bad in ("a/b", "..\\x", "image"):
        set_cell(root / "category.csv", 3, "name", bad)
        raises_naming(lambda: Broden(root), root / "category.csv", "bad or repeated category",
                      line=3)


@pytest.mark.parametrize("target", ["image", "label", "csv"])
def test_directory_where_a_file_should_be(root: Path, target: str) -> None:
    path = {"image": root / "images" / CAT_DIR / "000004.png",
            "label": root / "images" / label_png(4), "csv": root / "c_scene.csv"}[target]
    path.unlink()
    path.mkdir()
    fn = (lambda: Broden(root)) if target == "csv" else (lambda: Broden(root)[4])
    raises_naming(fn, path, "is a directory, not a file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
@pytest.mark.parametrize("target", ["label", "csv"])
def test_pipe_or_device_where_a_file_should_be(root: Path, target: str) -> None:
    path = root / "images" / label_png(5) if target == "label" else root / "label.csv"
    path.unlink()
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
    fn = (lambda: Broden(root)) if target == "csv" else (lambda: Broden(root)[5])
    raises_naming(fn, path, "not a regular file")
    path.unlink()
    path.symlink_to("/dev/zero")  # reading it would never end
    raises_naming(fn, path, "not a regular file")


def test_huge_sparse_file(root: Path) -> None:
    path = root / "index.csv"
    with open(path, "r+b") as f:
        f.truncate(1 << 31)
    raises_naming(lambda: Broden(root), path, r"bytes, more than the \d+ bytes read")


def test_missing_files_still_say_missing(root: Path) -> None:
    (root / "images" / label_png(7)).unlink()
    raises_naming(lambda: Broden(root)[7], root / "index.csv", "000007_color.png is missing",
                  line=9)
    (root / "c_texture.csv").unlink()
    raises_naming(lambda: Broden(root), root / "c_texture.csv", "is missing: a Broden folder")


# ---------------------------------------------------------------- the fuzz test

HOSTILE_VALUES = [
    "1000000000000", "1000000000", "9" * 5000, "65536", "65535", "-1", "0", "", " ", "1e3",
    "2.5", "nan", "inf", "\u0663", "x" * 131_073, "x" * 200_000, '"', '"open', "a,b", "a\nb",
    "..", ".", "../x.png", "../../index.csv", "/etc/passwd", "C:\\x.png", "\\\\server\\x.png",
    CAT_DIR, f"{CAT_DIR}/", "x" * 300 + ".png", "a\x00b", "\u2028", "\U0001f4a5", ";;;",
    "7;7;7", "1;" * 5000, f"{CAT_DIR}/000000_color.png;" * 200, "ABSOLUTE",
]
SIZES = [0, 1, 15, 17, 31, 33, 8192, 8193, 65535, 65536, 2**31, 10**12, 16, 32]
CLAIMS = [(2**31 - 1, 2**31 - 1), (1 << 16, 1 << 16), (1, 2**30 + 1), (17, 16), (16, 17),
          (0, 16), (32, 32), (16, 16), (8000, 8000)]


def _csvs(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith(".csv")]


def _pngs(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith(".png")]


# A mutation changes one thing of a fresh case and returns (what it did, whether the result is
# certainly invalid): a certainly invalid case that opens and reads is "silently accepted".
Mutation = tuple[str, bool]


def _m_flip(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(files)
    data = bytearray((root / name).read_bytes())
    spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 4))]
    for at in spots:
        data[at] = rng.randrange(256)
    rewrite(root / name, bytes(data))
    return f"flip bytes {spots} of {name}", False


def _m_truncate(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(files)
    data = (root / name).read_bytes()
    cut = rng.randrange(len(data))
    rewrite(root / name, data[:cut])  # a CSV cut after a line break is valid, only shorter
    return f"truncate {name} to {cut} bytes", not data[:cut].endswith(b"\n")


def _m_insert(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(files)
    data = (root / name).read_bytes()
    at = rng.randrange(len(data) + 1)
    extra = rng.choice([rng.randbytes(rng.randint(1, 16)), b"\xff\xfe", b"\x00", b"\n", b",",
                        b'"', b"\xc3", b"\r", b";"])
    rewrite(root / name, data[:at] + extra + data[at:])
    return f"insert {extra!r} at {at} of {name}", False


def _m_field(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(_csvs(files))
    rows = csv_rows(root / name)
    r = rng.randrange(len(rows))
    c = rng.randrange(len(rows[r]))
    value = rng.choice(HOSTILE_VALUES)
    if value == "ABSOLUTE":  # a real file outside images/: reading it must be refused
        value = str(root / "images" / label_png(0))
    rows[r][c] = value
    write_rows(root / name, rows)
    return f"set {name} line {r + 1} field {c} to {value[:40]!r} ({len(value)} chars)", False


def _m_encoding(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(_csvs(files))
    text = (root / name).read_text(encoding="utf-8")
    encoding = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252",
                           "utf-8-sig", "utf-7"])
    if encoding in ("latin-1", "cp1252"):
        at = text.index("\n") + 1 + rng.randrange(len(text) - text.index("\n"))
        text = text[:at] + "\u00e9" + text[at:]  # one non-ASCII character
    rewrite(root / name, text.encode(encoding))
    return f"re-encode {name} as {encoding}", encoding not in ("utf-8-sig", "utf-7")


def _m_header(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(_csvs(files))
    rows = csv_rows(root / name)
    header = rows[0]
    old = list(header)
    how = rng.choice(["duplicate", "append", "drop", "rename", "cut", "blank"])
    k = rng.randrange(len(header))
    if how == "duplicate":
        header[k] = rng.choice(header)
    elif how == "append":
        header.append(rng.choice(header))
    elif how == "drop":
        del header[k]
    elif how == "rename":
        header[k] += "x"
    elif how == "blank":
        header[k] = ""
    if how != "cut":
        write_rows(root / name, rows)
        return f"{how} a header column of {name}: {header}", how in ("append", "drop") or (
            how == "duplicate" and header != old)
    data = (root / name).read_bytes()
    cut = rng.randrange(data.index(b"\n") + 1)
    rewrite(root / name, data[:cut])
    return f"cut {name} inside its header at {cut}", True


def _m_lines(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(_csvs(files))
    lines = (root / name).read_bytes().split(b"\n")[:-1]
    how = rng.choice(["delete", "duplicate", "swap", "blank", "no final break", "crlf"])
    k = rng.randrange(len(lines))
    if how == "delete":
        del lines[k]
    elif how == "duplicate":
        lines.insert(k, lines[k])
    elif how == "swap":
        j = rng.randrange(len(lines))
        lines[k], lines[j] = lines[j], lines[k]
    elif how == "blank":
        lines.insert(k, b"")
    data = b"\n".join(lines) + b"\n"
    if how == "no final break":
        data = data[:-1]
    elif how == "crlf":
        data = data.replace(b"\n", b"\r\n")
    rewrite(root / name, data)
    return f"{how} line {k + 1} of {name}", how == "no final break"


def _m_size(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    line = rng.randint(2, 9)
    column = rng.choice(["ih", "iw", "sh", "sw"])
    value = str(rng.choice(SIZES))
    old = csv_rows(root / "index.csv")[line - 1][INDEX_HEADER.index(column)]
    set_cell(root / "index.csv", line, column, value)
    if rng.random() < 0.5:  # both sides, to ask for a huge allocation
        set_cell(root / "index.csv", line, {"ih": "iw", "iw": "ih", "sh": "sw", "sw": "sh"}[column],
                 value)
    return f"index.csv line {line}: {column} = {value} (maybe both sides)", value != old


def _m_path(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    line = rng.randint(2, 9)
    column = rng.choice(["image", "color", "object", "part"])
    rows = csv_rows(root / "index.csv")
    old = rows[line - 1][rows[0].index(column)].split(";")[0]
    same = f"{CAT_DIR}/./{old.split('/')[-1]}"  # the same file, another spelling: valid
    value = rng.choice([
        f"../broden/images/{old}", f"{CAT_DIR}/../../{old}", f"../{old}", f"{CAT_DIR}/../{old}",
        str(root / "images" / old), "/" + old, "C:/" + old, "\\" + old, old + "/", old + "x",
        "/dev/zero", "/proc/self/environ", f"{CAT_DIR}/" + "y" * 300 + ".png", old + "\x00",
        same,
    ])
    set_cell(root / "index.csv", line, column, value)
    return f"index.csv line {line}: {column} = {value!r}", value != same


def _m_delete(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(files)
    (root / name).unlink()
    return f"delete {name}", True


def _m_special(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(files)
    path = root / name
    path.unlink()
    how = rng.choice(["directory", "fifo", "/dev/zero", "loop", "dangling", "empty",
                      "to directory"])
    if how == "directory":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "loop":
        path.symlink_to(path.name)
    elif how == "dangling":
        path.symlink_to(path.name + ".nowhere")
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.symlink_to(root)
    return f"replace {name} by {how}", True


def _m_sparse(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(files)
    data = (root / name).read_bytes()
    rewrite(root / name, data)
    with open(root / name, "r+b") as f:
        f.truncate(rng.choice([1 << 31, (1 << 30) + 1]))
    return f"grow {name} to a huge sparse file", True


def _m_png_header(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice([f for f in files if f.endswith((".png", ".jpg"))])
    data = (root / name).read_bytes()
    side = 16 if "_" in Path(name).name else 32  # label planes are 16 px, images 32
    if not data.startswith(b"\x89PNG"):  # a JPEG image: edit its frame header
        height, width = rng.choice([(65535, 65535), (65535, 1), (0, 32), (33, 32), (32, 32)])
        rewrite(root / name, jpeg_claiming(data, height, width))
        return f"JPEG {name} claims {height}x{width}", (height, width) != (side, side)
    height, width = rng.choice(CLAIMS)
    fix = rng.random() < 0.8
    rewrite(root / name, png_claiming(data, height, width, fix_crc=fix))
    return f"PNG {name} claims {height}x{width} (CRC fixed: {fix})", (height, width) != (side,
                                                                                         side)


def _m_png_swap(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    name = rng.choice(_pngs(files))
    what = rng.choice(["rgb image", "16-bit rgb", "gray 16-bit", "gray", "rgba", "jpeg",
                       "unknown labels", "other png"])
    side = rng.choice([16, 32])
    gen = np.random.default_rng(rng.randrange(1 << 30))
    arrays = {
        "rgb image": gen.integers(0, 256, (side, side, 3), dtype=np.uint8),
        "16-bit rgb": gen.integers(0, 65536, (side, side, 3), dtype=np.uint16),
        "gray 16-bit": gen.integers(0, 65536, (side, side), dtype=np.uint16),
        "gray": gen.integers(0, 40, (side, side), dtype=np.uint8),
        "rgba": gen.integers(0, 3, (side, side, 4), dtype=np.uint8),
        "unknown labels": np.full((side, side, 3), 200, np.uint8),
    }
    if what == "other png":
        data = (root / rng.choice(_pngs(files))).read_bytes()
    elif what == "jpeg":
        data = cv2.imencode(".jpg", arrays["rgb image"])[1].tobytes()
    else:
        ok, enc = cv2.imencode(".png", arrays[what])
        data = enc.tobytes() if ok else b""
    rewrite(root / name, data)
    return f"replace {name} by a {side}px {what}", False


def _m_category(rng: random.Random, root: Path, files: list[str]) -> Mutation:
    line = rng.randint(2, 6)
    value = rng.choice(["z" * 300, "a/b", "../x", "color", "image", "", "sh", "\u00e9t\u00e9",
                        "x\\y", "nothing"])
    old = csv_rows(root / "category.csv")[line - 1][0]
    set_cell(root / "category.csv", line, "name", value)
    return f"category.csv line {line}: name = {value!r}", value != old


MUTATIONS = [_m_flip, _m_truncate, _m_insert, _m_field, _m_field, _m_encoding, _m_header,
             _m_lines, _m_size, _m_path, _m_delete, _m_special, _m_sparse, _m_png_header,
             _m_png_header, _m_png_swap, _m_category]

KINDS = [  # outcome classes: the first pattern that matches a DataError message
    ("encoding", r"not UTF-8 text|UTF-16 or UTF-32|a NUL byte"),
    ("field over the csv limit", r"a field is longer than"),
    ("cut short", r"ends inside this line|lists no images|is empty: expected a header"),
    ("missing column", r"lacks the columns"),
    ("duplicate column", r"more than once"),
    ("wrong field count", r"malformed row with \d+ fields"),
    ("path outside the folder", r"absolute path|climbs out|NUL character"),
    ("bad number", r"expected an integer|malformed row|neither a label number"),
    ("unknown label", r"not in label\.csv|does not list|appears twice"),
    ("bad category name", r"category name"),
    ("missing file", r"is missing"),
    ("directory", r"is a directory"),
    ("not a regular file", r"not a regular file"),
    ("file too large", r"bytes, more than|grew beyond"),
    ("size disagrees", r"but the row says"),
    ("too many pixels", r"pixels, more than|is more than \d+ or|pixel labels"),
    ("OS refuses", r"cannot be opened|cannot be read|not a valid path"),
    ("corrupt image", r"corrupt|not a readable image|OpenCV refuses|not a PNG|empty file|"
                      r"decodes to|has shape|frame header|truncated"),
    ("no labels or categories", r"lists no labels|lists no categories"),
]


def _kind(message: str) -> str:
    return next((k for k, p in KINDS if re.search(p, message)), "other")


def _link_copy(base: Path, root: Path, files: list[str]) -> None:
    """A fresh case: hard links to the base files (mutations replace, never edit, a file)."""
    for d in sorted({str(Path(f).parent) for f in files}):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in files:
        os.link(base / f, root / f)


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


_FILES: dict[Path, list[str]] = {}


def run_case(work: Path, seed: int) -> dict:
    """Mutate a fresh copy of a base Broden once (seeded), open it and read every item."""
    rng = random.Random(seed)
    base = work / rng.choice(["base_png", "base_jpg"])
    if base not in _FILES:
        _FILES[base] = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
    files = _FILES[base]
    root = work / f"case_{seed}"
    shutil.rmtree(root, ignore_errors=True)
    _link_copy(base, root, files)
    mutation = rng.choice(MUTATIONS)
    description, must_fail = mutation(rng, root, files)
    description = f"{base.name}: {description}"
    start = time.perf_counter()
    signal.alarm(10)  # a hang fails the case, it does not stall the suite
    try:
        read_all(root)
        outcome, message = ("silently accepted" if must_fail else "ok"), ""
    except DissectError as exc:
        message = str(exc)
        outcome = _kind(message) if str(root) in message else "names no file of the case"
    except BaseException as exc:  # anything else is the defect this test looks for
        outcome = "FAIL"
        message = "".join(traceback.format_exception(exc))[-3000:]
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return {"seed": seed, "mutation": description, "outcome": outcome,
            "message": message[:3000], "seconds": seconds}


def _worker(work: Path, first: int, count: int, memory_headroom: int) -> dict:
    logging.disable(logging.CRITICAL)  # the label-0 and line-break warnings of mutated files
    signal.signal(signal.SIGALRM, _on_alarm)
    # warm up (imports, codecs) before the address space is bounded; a case folder of its
    # own (workers run side by side in one work folder)
    run_case(work, -1 - first)
    try:
        import resource

        with open("/proc/self/status") as f:
            vm = int(re.search(r"VmSize:\s+(\d+) kB", f.read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + memory_headroom, vm + memory_headroom))
    except (ImportError, OSError, ValueError, AttributeError):
        pass  # no /proc or no RLIMIT_AS: time is still bounded
    classes: Counter = Counter()
    failures, slowest = [], {"seconds": 0.0}
    for seed in range(first, first + count):
        case = run_case(work, seed)
        classes[case["outcome"]] += 1
        if case["outcome"] in ("FAIL", "names no file of the case", "silently accepted"):
            failures.append(case)
        if case["seconds"] > slowest["seconds"]:
            slowest = case
    return {"cases": count, "classes": dict(classes), "failures": failures[:20],
            "slowest": slowest}


FUZZ_CASES = 3000
FUZZ_WORKERS = 2
MEMORY_HEADROOM = 1 << 30  # address space a worker may add: far below any unchecked allocation


@pytest.mark.skipif(not hasattr(signal, "SIGALRM") or not hasattr(os, "mkfifo"),
                    reason="the fuzz workers need POSIX signals and named pipes")
@pytest.mark.slow
def test_fuzz_every_outcome_is_success_or_dissect_error(tmp_path: Path) -> None:
    # thousands of tiny files made and removed: in memory (tmpfs) where there is one
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="broden_fuzz_", dir=shm)) if os.access(shm, os.W_OK) \
        else tmp_path
    try:
        _fuzz(work)
    finally:
        if work != tmp_path:
            shutil.rmtree(work, ignore_errors=True)


def _fuzz(work: Path) -> None:
    make_base(work / "base_png")
    make_base(work / "base_jpg", image_format="jpg")
    assert len(read_all(work / "base_png")) == len(read_all(work / "base_jpg")) == 8
    per = FUZZ_CASES // FUZZ_WORKERS
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(work), str(k * per), str(per)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for k in range(FUZZ_WORKERS)
    ]
    reports = []
    for proc in workers:
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in workers:
                p.kill()
            pytest.fail("a fuzz worker ran for more than 240 s")
        assert proc.returncode == 0, f"fuzz worker died ({proc.returncode}): {err[-3000:]}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    seconds = time.perf_counter() - start
    classes: Counter = Counter()
    for report in reports:
        classes.update(report["classes"])
    failures = [f for r in reports for f in r["failures"]]
    slowest = max((r["slowest"] for r in reports), key=lambda c: c["seconds"])
    summary = (f"{sum(classes.values())} fuzz cases in {seconds:.1f} s: "
               + ", ".join(f"{n} {k}" for k, n in classes.most_common())
               + f"; slowest case {slowest['seconds']:.3f} s ({slowest.get('mutation')})")
    log.info("%s", summary)
    assert not failures, "\n\n".join(
        f"seed {f['seed']} ({f['mutation']}): {f['outcome']}\n{f['message']}" for f in failures
    ) + f"\n\n{summary}\nrerun one: python {__file__} --case SEED"
    assert sum(classes.values()) == FUZZ_CASES
    assert classes["ok"] > FUZZ_CASES // 20, summary  # the mutations leave some data readable
    assert len(classes) >= 15, summary  # and reach most kinds of refusal
    assert slowest["seconds"] < 5, summary


if __name__ == "__main__":  # the fuzz worker, or one case by hand
    if sys.argv[1] == "--worker":
        result = _worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), MEMORY_HEADROOM)
        sys.stdout.write(json.dumps(result) + "\n")
    elif sys.argv[1] == "--case":
        with tempfile.TemporaryDirectory() as tmp:
            make_base(Path(tmp) / "base_png")
            make_base(Path(tmp) / "base_jpg", image_format="jpg")
            signal.signal(signal.SIGALRM, _on_alarm)
            sys.stdout.write(json.dumps(run_case(Path(tmp), int(sys.argv[2])), indent=1) + "\n")
