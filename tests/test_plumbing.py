"""The shared plumbing (dissect._plumbing): known answers for every helper, and the deprecated
keyword aliases of the public API."""

from __future__ import annotations

import base64
import csv
import filecmp
import json
import logging
import math
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dissect import DataError, DissectError, LayerNotFoundError
from dissect._plumbing.arrays import decode_array, encode_array
from dissect._plumbing.checks import batched_input, optional_positive_int, positive_int
from dissect._plumbing.chunks import row_chunks
from dissect._plumbing.deprecation import renamed_kwargs
from dissect._plumbing.images import batch_uint8, rgb_float, rgb_uint8, write_png
from dissect._plumbing.items import split_item, stack_inputs
from dissect._plumbing.paths import safe_name, unit_image_path
from dissect._plumbing.progress import progress_bar
from dissect._plumbing.result_files import read_json, result_path, write_json
from dissect._plumbing.store_layers import store_layers
from dissect.datasets import Concept, SyntheticConcepts, write_broden
from dissect.deconvnet import Patch, ReceptiveField, TopPatches, patch_grid, save_unit_grids
from dissect.hooks import Trace, capture
from dissect.netdissect import DissectionResult
from dissect.netdissect import dissect as netdissect
from dissect.report import write_report
from dissect.store import ActivationStore, StoreWriter, create_store

SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _bits(a: np.ndarray) -> bytes:
    """The raw little-endian bytes of an array (compares NaN payloads and -0.0 exactly)."""
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["features.13", "layer4.1.conv2", "conv1", "a-b_c.0", "X9"])
def test_safe_names_are_kept(name):
    assert safe_name(name) == name


def test_unsafe_names_get_their_own_safe_file_names():
    names = ["c 1", "c_1", "", ".", "..", ".hidden", "a/b", "a\\b", "çouche", "couche", "a_b",
             "hidden", "_", "c  1", "a/b/", "../x"]
    out = [safe_name(n) for n in names]
    assert len(set(out)) == len(names)  # distinct
    for n, s in zip(names, out, strict=True):
        assert SAFE.match(s), (n, s)
        assert s not in ("", ".", "..") and not s.startswith("."), (n, s)
        assert safe_name(n) == s  # deterministic
    assert safe_name("c 1") != safe_name("c_1") == "c_1"
    assert safe_name("c 1").startswith("c_1-")  # readable: the sanitized name, then a hash
    assert re.fullmatch(r"c_1-[0-9a-f]{8}", safe_name("c 1"))


def test_safe_name_of_a_name_that_looks_sanitized_does_not_collide():
    mimic = safe_name("c 1")  # "c_1-f342b2a3": itself a safe name
    assert safe_name(mimic) != safe_name("c 1")


def test_unit_image_path(tmp_path):
    for layer in ("features.13", "c 1", "a/b"):
        path = unit_image_path(tmp_path, layer, 7)
        assert path == tmp_path / safe_name(layer) / "unit_0007.png"
        assert path.name == "unit_0007.png" and path.parent.parent == tmp_path
    assert unit_image_path(str(tmp_path), "l", 12345).name == "unit_12345.png"
    assert unit_image_path(tmp_path, "l", np.int64(3)).name == "unit_0003.png"


# --------------------------------------------------------------------------- arrays


def _special(dtype: str) -> np.ndarray:
    if dtype == "bool":
        return np.array([[True, False, True], [False, False, True]])
    if dtype in ("uint8", "int32", "int64"):
        info = np.iinfo(dtype)
        return np.array([info.min, 0, 1, 7, info.max - 1, info.max], dtype=dtype).reshape(2, 3)
    info = np.finfo(dtype)
    values = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1 / 3, info.tiny, info.tiny / 4, info.max,
              -info.max, info.eps, np.pi]
    arr = np.array(values, dtype=dtype).reshape(3, 4)
    arr[0, 0] = np.copysign(np.nan, -1)  # a NaN with its sign bit set
    assert np.signbit(arr[0, 0]) and np.signbit(arr[0, 3])  # -NaN and -0.0
    return arr


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "bool",
                                   "uint8"])
def test_arrays_round_trip_bit_for_bit(dtype):
    arr = _special(dtype)
    doc = encode_array(arr)
    assert doc["dtype"] == dtype and doc["shape"] == list(arr.shape)
    json.dumps(doc)  # plain JSON
    back = decode_array(json.loads(json.dumps(doc)))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert _bits(back) == _bits(arr)
    assert back.flags.writeable and back.flags.c_contiguous  # a copy, not a view of the bytes
    back.flat[0] = back.flat[1]


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)])
def test_empty_arrays_round_trip(shape):
    for dtype in ("float32", "int64", "bool"):
        arr = np.zeros(shape, dtype=dtype)
        back = decode_array(encode_array(arr))
        assert back.shape == shape and back.dtype == arr.dtype


@pytest.mark.parametrize("value", [np.float32(-0.0), np.int64(-5), np.bool_(True)])
def test_zero_dimensional_arrays_keep_their_shape(value):
    arr = np.array(value)
    assert arr.shape == ()
    back = decode_array(encode_array(arr))
    assert back.shape == () and back.dtype == arr.dtype and _bits(back) == _bits(arr)


def test_zero_dimensional_arrays_keep_their_value():
    arr = np.array(-0.0, dtype=np.float32)
    back = decode_array(encode_array(arr))
    assert back.size == 1 and back.dtype == np.float32 and _bits(back) == _bits(arr)


def test_non_contiguous_big_endian_and_torch_inputs():
    base = np.arange(24, dtype=np.float64).reshape(4, 6) / 7
    view = base[::2, 1::2]
    assert not view.flags.c_contiguous
    back = decode_array(encode_array(view))
    assert back.shape == (2, 3) and _bits(back) == _bits(np.ascontiguousarray(view))
    big = np.array([[1.5, -0.0], [np.inf, 1e-40]], dtype=">f4")
    doc = encode_array(big)
    assert doc["dtype"] == "float32"
    assert base64.b64decode(doc["base64"]) == big.astype("<f4").tobytes()  # little-endian
    back = decode_array(doc)
    assert back.dtype == np.dtype("float32") and back.dtype.isnative
    assert _bits(back) == _bits(big.astype("<f4"))
    big_int = np.arange(5, dtype=">i8") - 2
    np.testing.assert_array_equal(decode_array(encode_array(big_int)), big_int)
    t = torch.linspace(-1, 1, 12, requires_grad=True).reshape(3, 4)
    back = decode_array(encode_array(t))
    assert back.dtype == np.float32 and torch.equal(torch.from_numpy(back), t.detach())
    tt = torch.arange(10).reshape(2, 5).t()  # a non-contiguous int64 tensor
    assert np.array_equal(decode_array(encode_array(tt)), tt.numpy())


def test_unsupported_dtypes_are_refused():
    for arr in (np.zeros(2, np.int16), np.zeros(2, np.complex64), np.array(["a"]),
                np.array([object()], dtype=object)):
        with pytest.raises(DissectError, match="cannot store"):
            encode_array(arr)


def _good_doc() -> dict:
    return encode_array(np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("dtype"),
    lambda d: d.pop("shape"),
    lambda d: d.pop("base64"),
    lambda d: d.update(base64="not base64!!"),
    lambda d: d.update(base64=d["base64"][:-4]),  # fewer bytes than the shape needs
    lambda d: d.update(base64=base64.b64encode(b"\0" * 23).decode()),  # not whole floats
    lambda d: d.update(shape=[3, 3]),
    lambda d: d.update(shape=[4]),
    lambda d: d.update(shape=[-2, -3]),
    lambda d: d.update(shape=["x"]),
    lambda d: d.update(shape=None),
    lambda d: d.update(shape=5),
    lambda d: d.update(dtype="float128"),
    lambda d: d.update(dtype="object"),
    lambda d: d.update(dtype=None),
    lambda d: d.update(dtype=["float32"]),
    lambda d: d.update(base64=None),
    lambda d: d.update(base64=12),
])
def test_malformed_array_documents_raise_dissect_error(damage):
    doc = _good_doc()
    damage(doc)
    with pytest.raises(DissectError, match="malformed images"):
        decode_array(doc, "images")


@pytest.mark.parametrize("doc", [None, 3, "x", [], ["float32", [2], ""]])
def test_array_documents_that_are_not_objects_raise_dissect_error(doc):
    with pytest.raises(DissectError, match="malformed"):
        decode_array(doc)


def test_infinite_shape_raises_dissect_error():
    doc = json.loads('{"dtype": "float32", "shape": [Infinity], "base64": ""}')
    with pytest.raises(DissectError):
        decode_array(doc)


# --------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("rows, size, chunks", [
    (10, 3, [(0, 3), (3, 6), (6, 9), (9, 10)]),
    (10, None, [(0, 10)]),
    (0, 4, []),
    (0, None, []),
    (9, 3, [(0, 3), (3, 6), (6, 9)]),
    (3, 10, [(0, 3)]),
    (1, 1, [(0, 1)]),
    (4, 1, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_row_chunks(rows, size, chunks):
    assert row_chunks(rows, size) == chunks


def test_row_chunks_cover_every_row_once():
    for rows in range(0, 30):
        for size in (1, 2, 5, 7, 64, None):
            chunks = row_chunks(rows, size)
            covered = [r for a, b in chunks for r in range(a, b)]
            assert covered == list(range(rows))
            assert all(0 < b - a <= (size or rows) for a, b in chunks)


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize("value", [1, 2, 10**12, np.int64(5), np.int32(1), np.uint8(3)])
def test_positive_int_accepts_ints(value):
    assert positive_int(value, "steps") == int(value)
    assert type(positive_int(value, "steps")) is int
    assert optional_positive_int(value, "steps") == int(value)
    assert type(optional_positive_int(value, "steps")) is int


@pytest.mark.parametrize("value", [True, False, np.True_, 1.0, 2.5, 0, -1, np.int64(-3), "3",
                                   None, [1], float("nan")])
def test_positive_int_refuses(value):
    with pytest.raises(DissectError, match="batch_size"):
        positive_int(value, "batch_size")


def test_positive_int_minimum_zero():
    assert positive_int(0, "steps", minimum=0) == 0
    assert positive_int(np.int64(0), "steps", minimum=0) == 0
    for bad in (-1, False, 0.0, "0"):
        with pytest.raises(DissectError, match=r"steps must be an integer >= 0"):
            positive_int(bad, "steps", minimum=0)
    with pytest.raises(DissectError, match="k must be an integer >= 3, got 2"):
        positive_int(2, "k", minimum=3)


@pytest.mark.parametrize("value", [True, np.True_, 1.0, 0, -2, "4", [2]])
def test_optional_positive_int_refuses(value):
    with pytest.raises(DissectError, match="batch_size must be a positive integer or None"):
        optional_positive_int(value, "batch_size")


def test_optional_positive_int_accepts_none():
    assert optional_positive_int(None, "batch_size") is None


def test_batched_input():
    x = torch.zeros(2, 3)
    assert batched_input(x) is x
    img = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    assert batched_input(img, "images") is img
    assert batched_input(torch.zeros(3, 1, dtype=torch.float16)).dtype == torch.float16
    with pytest.raises(DissectError, match="images must be a torch.Tensor.*ndarray"):
        batched_input(np.zeros((2, 3), np.float32), "images")
    with pytest.raises(DissectError, match="x must be a torch.Tensor.*list"):
        batched_input([[1.0]])
    with pytest.raises(DissectError, match=r"batched.*x\[None\]"):
        batched_input(torch.zeros(5))
    with pytest.raises(DissectError, match="batched"):
        batched_input(torch.tensor(1.0))
    for dtype in (torch.int64, torch.uint8, torch.bool):
        with pytest.raises(DissectError, match="floating point"):
            batched_input(torch.zeros(2, 3, dtype=dtype))
    with pytest.raises(DissectError, match="empty batch"):
        batched_input(torch.zeros(0, 3, 4, 4))


# --------------------------------------------------------------------------- items


def test_split_item_forms():
    x = torch.rand(3, 4, 4)
    got, index = split_item({"image": x, "index": 17, "other": 1}, 3)
    assert got is x and index == 17
    got, index = split_item({"image": x}, 3)
    assert got is x and index == 3
    got, index = split_item({"image": x, "index": None}, 3)
    assert got is x and index is None  # the item's own index, even None
    for seq in ((x, 5), [x, 5], (x,)):
        got, index = split_item(seq, 2)
        assert got is x and index == 2
    got, index = split_item(x, None)
    assert got is x and index is None
    arr = np.ones((3, 2, 2), np.float32)
    got, index = split_item(arr, 4)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and index == 4
    assert np.array_equal(got.numpy(), arr)
    got, _ = split_item({"image": arr.astype(np.uint8)}, 0)
    assert got.dtype == torch.uint8  # integer inputs are fine unless float_only
    got, _ = split_item((arr,), 0, float_only=True)
    assert got.dtype == torch.float32


def test_split_item_errors():
    with pytest.raises(DataError, match="dict without an 'image' key.*'img'"):
        split_item({"img": torch.zeros(3)}, 0)
    with pytest.raises(DataError, match="a batch is a dict"):
        split_item({}, 0, batched=True)
    with pytest.raises(DataError, match="empty tuple"):
        split_item((), 0)
    with pytest.raises(DataError, match="empty list"):
        split_item([], 0)
    for bad in ("image.png", 3.0, None, {"image": [1.0, 2.0]}, ([1.0],)):
        with pytest.raises(DataError, match="not a tensor.*transform"):
            split_item(bad, 0)
    with pytest.raises(DataError, match="int64 tensor, not a float one"):
        split_item(torch.zeros(3, 2, 2, dtype=torch.int64), 0, float_only=True)
    with pytest.raises(DataError, match="uint8"):
        split_item({"image": np.zeros((3, 2, 2), np.uint8)}, 0, float_only=True)
    assert issubclass(DataError, DissectError)


def test_stack_inputs():
    xs = [torch.full((3, 2, 2), float(i)) for i in range(4)]
    batch = stack_inputs(xs)
    assert batch.shape == (4, 3, 2, 2) and torch.equal(batch[2], xs[2])
    assert stack_inputs(xs[:1]).shape == (1, 3, 2, 2)
    with pytest.raises(DataError, match=r"different shapes.*\(3, 2, 2\).*\(3, 4, 4\)"):
        stack_inputs([torch.zeros(3, 2, 2), torch.zeros(3, 4, 4)])


# --------------------------------------------------------------------------- images


def test_rgb_float_layouts():
    chw = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    out = rgb_float(chw)
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, chw.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(rgb_float(chw[None]), out)  # a batch of one
    hwc = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    out = rgb_float(hwc)
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, hwc / 255.0, rtol=1e-6)
    gray = torch.tensor([[0.0, 0.5], [0.25, 1.0]])
    out = rgb_float(gray)
    assert out.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray.numpy())
    gray8 = np.array([[0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb_float(gray8), [[[0, 0, 0], [1, 1, 1]]])
    one = torch.rand(1, 3, 3)  # one channel, channels first
    np.testing.assert_array_equal(rgb_float(one), np.repeat(one[0].numpy()[..., None], 3, 2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    assert rgb_float(rgba).shape == (2, 2, 3) and rgb_float(rgba).max() == 0
    u8 = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    assert (rgb_float(u8) == 1).all()
    with pytest.raises(DataError, match="RGB image"):
        rgb_float(np.zeros((2, 2, 5)))
    with pytest.raises(DataError, match="RGB image"):
        rgb_float(np.zeros(4))


def test_rgb_float_nan_and_clipping(caplog):
    x = torch.tensor([[[float("nan"), 0.5]], [[0.2, 0.3]], [[0.1, 1.0]]])
    with caplog.at_level(logging.WARNING, logger="dissect"):
        out = rgb_float(x)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 0.5
    assert not caplog.records  # in range: no warning
    y = torch.tensor([[[-0.5, 2.0]], [[0.2, 0.3]], [[0.1, 1.0]]])
    with caplog.at_level(logging.WARNING, logger="dissect"):
        out = rgb_float(y)
    assert out.min() == 0 and out.max() == 1
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 1
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "outside [0, 1]" in caplog.text and "denormalize" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dissect"):
        rgb_float(torch.full((3, 2, 2), 1.0005))  # rounding noise is tolerated
    assert not caplog.records


def test_rgb_uint8_and_batch_uint8(caplog):
    x = torch.tensor([[[0.0, 1.0, 0.2, 0.5]],
                      [[1.0, 0.0, float("nan"), 0.25]],
                      [[0.0, 0.0, 3.0, -1.0]]])
    with caplog.at_level(logging.WARNING, logger="dissect"):
        out = rgb_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0].tolist() == [[0, 255, 0], [255, 0, 0], [51, 0, 255], [128, 64, 0]]
    assert "outside [0, 1]" in caplog.text
    ready = np.zeros((2, 2, 3), np.uint8)
    assert rgb_uint8(ready) is ready  # uint8 RGB passes through
    batch = batch_uint8(torch.stack([x, x.flip(-1)]))
    assert batch.shape == (2, 1, 4, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], out)
    np.testing.assert_array_equal(batch[1], out[:, ::-1])
    np.testing.assert_array_equal(batch_uint8(x), out[None])  # one (3, H, W) image
    np.testing.assert_array_equal(batch_uint8(x.numpy().astype(np.float64)), out[None])
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        batch_uint8(torch.zeros(2, 1, 4, 4))


def test_write_png_round_trip_keeps_rgb_order(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[0, 1] = (255, 0, 0)  # pure red
    rgb[2, 3] = (0, 0, 255)  # pure blue
    rgb[1, 2] = (10, 200, 30)
    path = write_png(tmp_path / "new" / "deeper" / "a.png", rgb)
    assert path == tmp_path / "new" / "deeper" / "a.png" and path.is_file()
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert bgr.shape == (3, 4, 3) and bgr.dtype == np.uint8
    assert bgr[0, 1].tolist() == [0, 0, 255]  # OpenCV reads BGR: red is the last channel
    assert bgr[2, 3].tolist() == [255, 0, 0]
    np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), rgb)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # a float tensor image
    write_png(tmp_path / "b.png", chw)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "b.png"))[..., ::-1], rgb)
    write_png(str(tmp_path / "c.png"), rgb[..., 0])  # grayscale, str path
    c = cv2.imread(str(tmp_path / "c.png"))
    assert (c[..., 0] == rgb[..., 0]).all() and (c[..., 2] == rgb[..., 0]).all()


def test_write_png_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="could not write"):
        write_png(blocker / "a.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataError, match="could not write"):
        write_png(blocker / "sub" / "a.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataError, match="could not write"):
        write_png(tmp_path / "a.unknown-extension", np.zeros((2, 2, 3), np.uint8))


# --------------------------------------------------------------------------- deprecation


@renamed_kwargs(batch="batch_size", out="out_dir")
def _run(x, *, batch_size=None, out_dir=None):
    """Run something."""
    return x, batch_size, out_dir


def test_renamed_kwargs_alias_warns_and_forwards():
    with pytest.warns(DeprecationWarning) as rec:
        assert _run(1, batch=4) == (1, 4, None)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "_run(batch=...)" in msg and "use batch_size=" in msg and "deprecated" in msg
    assert rec[0].filename == __file__  # stacklevel: the warning points at the caller
    with pytest.warns(DeprecationWarning) as rec:
        assert _run(2, batch=1, out="d") == (2, 1, "d")
    assert sorted(str(r.message).split("(")[1].split("=")[0] for r in rec) == ["batch", "out"]


def test_renamed_kwargs_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(1, batch_size=3, out_dir="o") == (1, 3, "o")
        assert _run(1) == (1, None, None)


def test_renamed_kwargs_both_names_is_an_error():
    with pytest.raises(DissectError, match=r"_run: give batch_size= .*batch=.*not both"):
        _run(1, batch=2, batch_size=3)


def test_renamed_kwargs_keeps_the_function_identity():
    assert _run.__name__ == "_run"
    assert _run.__doc__ == "Run something."
    assert _run.__wrapped__(5) == (5, None, None)

    class Thing:
        @renamed_kwargs(size="width")
        def __init__(self, width=1):
            self.width = width

    with pytest.warns(DeprecationWarning, match=r"Thing\(size=\.\.\.\).*use width="):
        assert Thing(size=3).width == 3
    assert Thing.__init__.__name__ == "__init__"


# the real deprecated aliases of the public API -----------------------------


def test_trace_transform_alias(tiny, images):
    def record(name, t):
        return t.amax(dim=(2, 3))

    with Trace(tiny, ["0", "3"], record=record) as tr:
        tiny(images)
    with pytest.warns(DeprecationWarning, match=r"Trace\(transform=\.\.\.\).*use record="):
        old = Trace(tiny, ["0", "3"], transform=record)
    with old:
        tiny(images)
    assert old.outputs.keys() == tr.outputs.keys() == {"0", "3"}
    for name in tr.outputs:
        assert torch.equal(old.outputs[name], tr.outputs[name])
    with pytest.raises(DissectError, match="not both"):
        Trace(tiny, ["0"], transform=record, record=record)


@pytest.fixture(scope="module")
def concepts_store(tmp_path_factory):
    """A few synthetic concept images captured through a one-conv model (no pooling)."""
    folder = tmp_path_factory.mktemp("nd")
    ds = SyntheticConcepts(8, size=16, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    store = capture(model, ds, ["0", "1"], folder / "acts.h5", pool=None, dtype="float32",
                    progress=False)
    store.close()
    return folder / "acts.h5", ds


def test_dissect_top_k_alias(concepts_store):
    path, ds = concepts_store
    with ActivationStore(path) as store:
        new = netdissect(store, ds, quantile=0.2, k=3, progress=False)
        with pytest.warns(DeprecationWarning, match=r"dissect\(top_k=\.\.\.\).*use k="):
            old = netdissect(store, ds, quantile=0.2, top_k=3, progress=False)
        with pytest.raises(DissectError, match="not both"):
            netdissect(store, ds, quantile=0.2, top_k=3, k=3, progress=False)
    assert old.layers == new.layers == ["0", "1"]
    for layer in new.layers:
        assert old.top_images(layer).shape == (4, 3)
        np.testing.assert_array_equal(old.top_images(layer), new.top_images(layer))
        np.testing.assert_array_equal(old.iou(layer), new.iou(layer))
        np.testing.assert_array_equal(old.thresholds(layer), new.thresholds(layer))


def _top_patches() -> TopPatches:
    """A hand-made result: 2 units of layer "conv", 3 patches each, 5x5 windows."""
    g = torch.Generator().manual_seed(3)
    units, k = [4, 1], 3
    field = ReceptiveField("conv", (16, 16), (8, 8), (5, 5), (2, 2), (-2, -2))
    patches = [[Patch(u, r, row=2 * r + n, index=100 + 2 * r + n, value=3.0 - r - 0.1 * n,
                      position=(r, n), box=(0, 3, 0, 5), window=(0, 5, 0, 5))
                for r in range(k)] for n, u in enumerate(units)]
    images = torch.randn(2, k, 3, 5, 5, generator=g)
    projections = torch.randn(2, k, 3, 5, 5, generator=g)
    return TopPatches("conv", "deconvnet", units, field, patches, images, projections)


def test_patch_grid_transform_alias():
    top = _top_patches()

    def pre(p):
        return (p * 0.25 + 0.5).clamp(0, 1)

    new = patch_grid(top, denormalize=pre, tile=8)
    with pytest.warns(DeprecationWarning, match=r"patch_grid\(transform=\.\.\.\).*denormalize="):
        old = patch_grid(top, transform=pre, tile=8)
    assert old.dtype == np.uint8 and old.ndim == 3
    np.testing.assert_array_equal(old, new)
    assert not np.array_equal(new, patch_grid(top, tile=8))  # the argument was used


def test_save_unit_grids_directory_alias(tmp_path):
    top = _top_patches()
    new = save_unit_grids(top, out_dir=tmp_path / "new", tile=8)
    with pytest.warns(DeprecationWarning, match=r"save_unit_grids\(directory=.*use out_dir="):
        old = save_unit_grids(top, directory=tmp_path / "old", tile=8)
    assert sorted(old) == sorted(new) == [1, 4]
    for unit in (1, 4):
        assert old[unit] == unit_image_path(tmp_path / "old", "conv", unit)
        assert new[unit] == unit_image_path(tmp_path / "new", "conv", unit)
        np.testing.assert_array_equal(cv2.imread(str(old[unit])), cv2.imread(str(new[unit])))


def _small_dissection() -> DissectionResult:
    concepts = [Concept(1, "red", "color"), Concept(2, "blue", "color"),
                Concept(4, "striped", "texture")]
    iou = {"features.3": np.array([[0.30, 0.01, 0.02], [0.0, 0.05, 0.2], [0.01, 0.0, 0.03]]),
           "c 1": np.array([[0.1, 0.2, 0.3], [0.06, 0.0, 0.01]])}
    thr = {k: np.linspace(-1, 1, len(v)).astype(np.float32) for k, v in iou.items()}
    top = {k: np.arange(2 * len(v), dtype=np.int64).reshape(len(v), 2) for k, v in iou.items()}
    return DissectionResult(list(iou), concepts, ["color", "texture"], iou, thr, top,
                            quantile=0.005, iou_threshold=0.04, meta={"model": "tiny"})


def test_write_report_out_alias(tmp_path):
    results = tmp_path / "results"
    _small_dissection().to_json(results / "netdissect.json")
    new = write_report(results, out_dir=tmp_path / "new")
    with pytest.warns(DeprecationWarning, match=r"write_report\(out=\.\.\.\).*use out_dir="):
        old = write_report(results, out=tmp_path / "old")
    assert new == tmp_path / "new" / "index.html" and old == tmp_path / "old" / "index.html"
    names = sorted(p.name for p in (tmp_path / "new").glob("*.html"))
    assert names == sorted(p.name for p in (tmp_path / "old").glob("*.html"))
    assert len(names) == 3  # index and one page per layer
    for name in names:
        assert (tmp_path / "old" / name).read_text() == (tmp_path / "new" / name).read_text()
    assert not (results / "report").exists()


def test_write_broden_root_alias(tmp_path):
    ds = SyntheticConcepts(3, size=16, seed=1)
    new = write_broden(ds, out_dir=tmp_path / "new")
    with pytest.warns(DeprecationWarning, match=r"write_broden\(root=\.\.\.\).*use out_dir="):
        old = write_broden(ds, root=tmp_path / "old")
    assert new == tmp_path / "new" and old == tmp_path / "old"
    files = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
    assert Path("index.csv") in files and len(files) > 5
    match, mismatch, errors = filecmp.cmpfiles(new, old, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors


def test_dissection_to_csv_directory_alias(tmp_path):
    res = _small_dissection()
    new = res.to_csv(path=tmp_path / "new")
    with pytest.warns(DeprecationWarning, match=r"DissectionResult\.to_csv\(directory=.*path="):
        old = res.to_csv(directory=tmp_path / "old")
    assert [p.name for p in old] == [p.name for p in new] == [
        "features.3.csv", f"{safe_name('c 1')}.csv"]
    for a, b in zip(old, new, strict=True):
        assert a.parent == tmp_path / "old" and a.read_text() == b.read_text()
    with pytest.warns(DeprecationWarning):
        (single,) = res.to_csv(directory=tmp_path / "all.csv")
    with open(single) as f:
        assert next(csv.reader(f))[0] == "layer"


# --------------------------------------------------------------------------- store layers


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.h5"
    layers = {"conv1": (2, 3, 3), "layer1.0": (3, 2, 2), "fc": (4,)}
    n = 3
    create_store(path, n=n, layers=layers, dtype="float32", pool=None, attrs={})
    rng = np.random.default_rng(0)
    acts = {k: rng.random((n, *s)).astype(np.float32) for k, s in layers.items()}
    maxima = {k: v.reshape(n, v.shape[1], -1).max(-1) if v.ndim > 2 else v
              for k, v in acts.items()}
    with StoreWriter(path) as w:
        w.write(0, np.arange(n), acts, maxima)
        w.finish()
    with ActivationStore(path) as s:
        yield s


def test_store_layers_selectors(store):
    assert store.layers == ["conv1", "layer1.0", "fc"]
    assert store_layers(store, None) == ["conv1", "layer1.0", "fc"]
    assert store_layers(store, "fc") == ["fc"]
    assert store_layers(store, ["fc", "conv1", "fc", "conv1"]) == ["fc", "conv1"]
    assert store_layers(store, ("layer1.0",)) == ["layer1.0"]
    assert store_layers(store, (n for n in ["fc", "conv1"])) == ["fc", "conv1"]
    assert store_layers(store, lambda n: n.startswith(("fc", "layer"))) == ["layer1.0", "fc"]
    assert store_layers(store, lambda n: True) == store.layers
    out = store_layers(store, None)
    out.append("x")
    assert store.layers == ["conv1", "layer1.0", "fc"]  # a fresh list


def test_store_layers_errors(store):
    with pytest.raises(LayerNotFoundError, match=r"'conv' is not in .*did you mean conv1"):
        store_layers(store, "conv")
    with pytest.raises(LayerNotFoundError, match=r"'layer1\.1'.*holds conv1, layer1\.0, fc"):
        store_layers(store, ["fc", "layer1.1"])
    with pytest.raises(LayerNotFoundError) as info:
        store_layers(store, ["zzzzzz"])
    assert "did you mean" not in str(info.value) and isinstance(info.value, DissectError)
    with pytest.raises(LayerNotFoundError, match="3"):
        store_layers(store, [3])
    with pytest.raises(DissectError, match="no layers to probe"):
        store_layers(store, [], what="probe")
    with pytest.raises(DissectError, match="predicate chose none"):
        store_layers(store, lambda n: False)
    for bad in (5, 2.5):
        with pytest.raises(DissectError, match="layers must be a name.*not (int|float)"):
            store_layers(store, bad)


# --------------------------------------------------------------------------- progress


def test_progress_bar_policy():
    bars = [
        (progress_bar(10, "x", enabled=False), True),
        (progress_bar(10, "x", enabled=False, outer=True), True),
        (progress_bar(1, "x"), True),
        (progress_bar(0, "x"), True),
        (progress_bar(None, "x", iterable=[1]), True),  # total from len(iterable)
        (progress_bar(2, "x"), False),
        (progress_bar(1, "x", outer=True), False),
        (progress_bar(0, "x", outer=True), False),
        (progress_bar(None, "x"), False),  # unknown length: shown
    ]
    try:
        for n, (bar, disabled) in enumerate(bars):
            assert bar.disable is disabled, n
    finally:
        for bar, _ in bars:
            bar.close()
    bar = progress_bar(3, "y", unit="img", initial=1, outer=True)
    try:
        assert bar.total == 3 and bar.n == 1 and bar.unit == "img" and bar.desc == "y"
        assert bar.leave and bar.delay == 0
    finally:
        bar.close()
    inner = progress_bar(5, "z")
    try:
        assert not inner.leave and inner.delay > 0
    finally:
        inner.close()
    with progress_bar(iterable=range(4), enabled=False) as bar:
        assert list(bar) == [0, 1, 2, 3] and bar.total == 4


# --------------------------------------------------------------------------- result files


def test_result_path(tmp_path):
    assert result_path(tmp_path, "r.json") == tmp_path / "r.json"
    assert result_path(tmp_path / "x.json", "r.json") == tmp_path / "x.json"
    assert result_path(str(tmp_path / "new"), "r.json") == tmp_path / "new"  # not a folder yet


def test_write_json_is_atomic_and_replaces_whole(tmp_path):
    path = tmp_path / "sub" / "r.json"
    big = {"format": "f", "version": 1, "data": list(range(5000))}
    assert write_json(path, big) == path
    assert json.loads(path.read_text()) == big
    small = {"format": "f", "version": 1, "data": [1]}
    write_json(str(path), small, indent=2)
    assert json.loads(path.read_text()) == small  # replaced whole, nothing of the old left
    assert "\n  " in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary file
    assert read_json(path, "f", 1, "thing") == small


def test_write_json_nan(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"x": 1})
    with pytest.raises((ValueError, DissectError)):
        write_json(path, {"x": float("nan")})
    with pytest.raises((ValueError, DissectError)):
        write_json(path, {"x": [float("inf")]})
    assert json.loads(path.read_text()) == {"x": 1}  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    write_json(path, {"x": float("nan"), "y": -math.inf}, allow_nan=True)
    back = json.loads(path.read_text())
    assert math.isnan(back["x"]) and back["y"] == -math.inf


def test_write_json_nan_is_a_dissect_error(tmp_path):
    with pytest.raises(DissectError):
        write_json(tmp_path / "r.json", {"x": float("nan")})


def test_write_json_failure_leaves_nothing(tmp_path):
    (tmp_path / "r.json").mkdir()  # a folder where the file should go: os.replace fails
    with pytest.raises(DissectError, match="could not write"):
        write_json(tmp_path / "r.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_read_json_refusals(tmp_path):
    good = tmp_path / "good.json"
    write_json(good, {"format": "fmt", "version": 2, "x": 1})
    assert read_json(good, "fmt", 2, "thing")["x"] == 1
    with pytest.raises(DissectError, match="not a torch-dissect thing"):
        read_json(good, "other", 2, "thing")
    with pytest.raises(DissectError, match="thing of version 2; this release reads version 3"):
        read_json(good, "fmt", 3, "thing")
    cases = {
        "invalid.json": '{"format": "fmt", "version": 2,',
        "empty.json": "",
        "list.json": '[{"format": "fmt", "version": 2}]',
        "string.json": '"fmt"',
        "noversion.json": '{"format": "fmt"}',
        "noformat.json": '{"version": 2}',
        "binary.json": None,
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(b"\xff\xfe\x00garbage\x80")
        else:
            path.write_text(text)
        with pytest.raises(DissectError):
            read_json(path, "fmt", 2, "thing")
    with pytest.raises(DissectError, match="cannot read a thing"):
        read_json(tmp_path / "missing.json", "fmt", 2, "thing")
    with pytest.raises(DissectError, match="cannot read a thing"):
        read_json(tmp_path, "fmt", 2, "thing")  # a folder
