"""The annotation cache: a second dissection reads label planes from it, with equal results;
a changed dataset is never served stale; a damaged cache is rebuilt."""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np
import pytest
import torch
from test_netdissect import TinyConcepts, _store

from dissect.datasets import SyntheticConcepts, write_broden
from dissect.datasets.annotation_cache import annotation_batches, cache_file, cache_folder
from dissect.datasets.broden import Broden
from dissect.datasets.concepts import collate
from dissect.netdissect import dissect


class Counted(TinyConcepts):
    """TinyConcepts with a cache identity, counting the items it decodes."""

    def __init__(self, n: int, seg: tuple[int, int], seed: int = 0) -> None:
        super().__init__(n, seg, seed)
        self.seed, self.decoded = seed, 0

    def cache_identity(self) -> dict:
        return {"tiny": self.n, "seed": self.seed, "seg": list(self.pixel.shape[2:])}

    def __getitem__(self, i: int) -> dict:
        self.decoded += 1
        return super().__getitem__(i)


def _direct(ds, items, batch_size):
    return [collate([ds[int(i)] for i in items[s : s + batch_size]])
            for s in range(0, len(items), batch_size)]


def _same_batches(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        for key in ("pixel_labels", "image_labels", "annotated", "index"):
            assert torch.equal(torch.as_tensor(g[key]), torch.as_tensor(r[key])), key


def test_cache_serves_identical_batches_after_one_pass(tmp_path):
    ds = Counted(23, (6, 5))
    items = np.arange(23)
    ref = _direct(ds, items, 4)
    ds.decoded = 0
    with annotation_batches(ds, items, 4, cache=tmp_path) as batches:
        first = list(batches)
    assert ds.decoded == 23
    path = cache_file(ds, tmp_path)
    assert path.is_file() and path.parent == cache_folder(tmp_path)
    with annotation_batches(ds, items, 4, cache=tmp_path) as batches:
        second = list(batches)
    assert ds.decoded == 23  # nothing decoded again
    _same_batches(first, ref)
    _same_batches(second, ref)
    # any order and subset of the items, other batch sizes
    some = np.array([5, 2, 2, 17, 0, 22])
    with annotation_batches(ds, some, 3, cache=tmp_path) as batches:
        _same_batches(list(batches), _direct(ds, some, 3))
    assert ds.decoded == 23 + 6  # (the reference above decoded 6)


def test_partial_cache_is_completed_and_merged(tmp_path):
    ds = Counted(12, (4, 4))
    with annotation_batches(ds, np.arange(5), 2, cache=tmp_path) as batches:
        list(batches)
    ds.decoded = 0
    with annotation_batches(ds, np.arange(3, 12), 2, cache=tmp_path) as batches:
        list(batches)  # not covered: decoded, and the new file keeps items 0-2 too
    assert ds.decoded == 9
    ds.decoded = 0
    with annotation_batches(ds, np.arange(12), 5, cache=tmp_path) as batches:
        got = list(batches)
    assert ds.decoded == 0
    _same_batches(got, _direct(ds, np.arange(12), 5))


def test_interrupted_pass_writes_no_cache(tmp_path):
    ds = Counted(10, (4, 4))
    with annotation_batches(ds, np.arange(10), 3, cache=tmp_path) as batches:
        next(iter(batches))  # the run stops after one batch
    assert not cache_file(ds, tmp_path).exists()
    assert not list(cache_folder(tmp_path).glob("*.tmp-*"))


def test_no_cache_without_identity_or_when_off(tmp_path):
    ds = TinyConcepts(6, (4, 4))
    assert cache_file(ds, tmp_path) is None
    with annotation_batches(ds, np.arange(6), 4, cache=tmp_path) as batches:
        _same_batches(list(batches), _direct(ds, np.arange(6), 4))
    assert not cache_folder(tmp_path).exists()
    counted = Counted(6, (4, 4))
    with annotation_batches(counted, np.arange(6), 4, cache=False) as batches:
        list(batches)
    assert not cache_folder(tmp_path).exists()


def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    ds = Counted(8, (4, 4))
    with annotation_batches(ds, np.arange(8), 4, cache=tmp_path) as batches:
        list(batches)
    path = cache_file(ds, tmp_path)
    path.write_bytes(b"not hdf5" * 100)
    ds.decoded = 0
    with caplog.at_level(logging.WARNING, logger="dissect"):
        with annotation_batches(ds, np.arange(8), 4, cache=tmp_path) as batches:
            got = list(batches)
    assert "ignoring the annotation cache" in caplog.text
    assert ds.decoded == 8
    _same_batches(got, _direct(ds, np.arange(8), 4))
    with h5py.File(path) as f:  # rebuilt
        assert f.attrs["format"] == "torch-dissect annotation cache"


def test_label_numbers_beyond_uint16_are_not_cached(tmp_path):
    ds = Counted(4, (3, 3))
    ds.pixel[1, 0, 0, 0] = 70000
    with annotation_batches(ds, np.arange(4), 2, cache=tmp_path) as batches:
        got = list(batches)
    assert int(got[0]["pixel_labels"].max()) == 70000
    assert not cache_file(ds, tmp_path).exists()


def test_dissect_uses_the_cache_with_identical_results(tmp_path):
    ds = Counted(30, (8, 8))
    acts = np.random.default_rng(1).standard_normal((30, 3, 4, 4)).astype(np.float32)
    with _store(tmp_path / "a.h5", acts) as store:
        plain = dissect(store, ds, progress=False, batch_size=7, annotation_cache=False)
        ds.decoded = 0
        first = dissect(store, ds, progress=False, batch_size=7)  # DISSECT_CACHE_DIR: conftest
        assert ds.decoded == 30
        second = dissect(store, ds, progress=False, batch_size=7)
        assert ds.decoded == 30
    assert cache_file(ds).parent == cache_folder(os.environ["DISSECT_CACHE_DIR"])
    for result in (first, second):
        np.testing.assert_array_equal(result.iou("conv"), plain.iou("conv"))


def test_broden_key_follows_its_files(tmp_path):
    root = write_broden(SyntheticConcepts(6, size=32, seed=2), tmp_path / "broden",
                        progress=False)
    a = cache_file(Broden(root), tmp_path)
    assert cache_file(Broden(root), tmp_path) == a
    png = next((root / "images").rglob("*.png"))
    st = png.stat()
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_file(Broden(root), tmp_path) != a
    assert cache_file(Broden(root, categories=["color"]), tmp_path) != cache_file(
        Broden(root), tmp_path)


def test_synthetic_annotations_match_items():
    ds = SyntheticConcepts(5, size=32, seed=3)
    for i in range(5):
        item, ann = ds[i], ds.annotations(i)
        assert set(item) - set(ann) == {"image"}
        for key in ann:
            assert torch.equal(torch.as_tensor(item[key]), torch.as_tensor(ann[key]))


@pytest.mark.parametrize("cached", [False, True])
def test_broden_dissection_same_with_and_without_cache(tmp_path, cached):
    root = write_broden(SyntheticConcepts(12, size=32, seed=4), tmp_path / "broden",
                        progress=False)
    ds = Broden(root)
    acts = np.random.default_rng(2).random((12, 4, 4, 4)).astype(np.float32)
    with _store(tmp_path / "s.h5", acts) as store:
        ref = dissect(store, ds, progress=False, annotation_cache=False)
        for _ in range(2 if cached else 1):
            got = dissect(store, ds, progress=False, annotation_cache=tmp_path / "c")
    np.testing.assert_array_equal(got.iou("conv"), ref.iou("conv"))
    assert cache_file(ds, tmp_path / "c").exists()
