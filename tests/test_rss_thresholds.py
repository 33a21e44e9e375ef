"""The memory-lean threshold pass (issue #19: peak RSS flat in N) computes what the plain one did.

``_thresholds`` reads the store's blocks through two buffers reused from batch to batch, and
``TopK`` keeps its values in one buffer partitioned in place; neither may change a threshold
or the non-finite bookkeeping. The annotation pass hands the freed heap back on exit. No
memory is measured here (see ``benchmarks/bench_netdissect_scale.py``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dissect.netdissect.run import _note_rows, _thresholds
from dissect.stats import exact_quantiles
from dissect.store import ActivationStore, StoreWriter, create_store

UNITS, H, W = 256, 8, 8  # 16384 values a row: _thresholds reads 256 rows a block
ROWS = 300  # blocks of 256 and 44 rows: the last one shorter


def _store(path, acts: np.ndarray, dtype: str) -> ActivationStore:
    create_store(path, n=len(acts), layers={"layer": acts.shape[1:]}, dtype=dtype, pool=None,
                 attrs={})
    with StoreWriter(path) as w:
        stored = acts.astype(dtype)
        w.write(0, np.arange(len(acts)), {"layer": stored},
                {"layer": stored.astype(np.float32).max(axis=(2, 3))})
        w.finish()
    return ActivationStore(path)


def _acts(nonfinite: bool) -> np.ndarray:
    rng = np.random.default_rng(19)
    acts = np.maximum(rng.standard_normal((ROWS, UNITS, H, W)).astype(np.float32) - 1.0, 0)
    acts[:, 5] = 0.0  # a dead unit: threshold 0
    acts[:, 6] = 2.5  # a constant unit
    if nonfinite:
        acts[3, 7, 2, 2] = np.nan
        acts[270, 7, :, 1] = np.inf
        acts[299, 8] = -np.inf
    return acts


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_thresholds_equal_numpy_and_the_plain_batches(tmp_path, dtype, nonfinite):
    acts = _acts(nonfinite)
    store = _store(tmp_path / "s.h5", acts, dtype)
    ds = store["layer"]
    thr, found = _thresholds(store, ["layer"], range(ROWS), 0.005, torch.device("cpu"), None)

    values = acts.astype(dtype).transpose(1, 0, 2, 3).reshape(UNITS, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanquantile(np.where(np.isfinite(values), values, np.nan), 0.995, axis=1)
    assert thr["layer"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(thr["layer"], expected.astype(dtype))

    # the plain generator (each block allocated anew), blocks of the same rows
    read = 256
    plain = exact_quantiles(_fresh_blocks(ds, range(ROWS), read), UNITS, ROWS * H * W,
                            0.995, dtype=np.dtype(dtype), return_nonfinite=True,
                            on_nonfinite=_note_rows(type(found["layer"])("layer"), range(ROWS),
                                                    read, (UNITS, H, W)))
    np.testing.assert_array_equal(thr["layer"], plain[0])
    summary = found["layer"].summary()
    assert summary.total == int(np.count_nonzero(~np.isfinite(values)))
    assert summary.rows == ((3, 270, 299) if nonfinite else ())
    assert summary.values == values.size


def _fresh_blocks(ds, rows: range, read: int):
    """The reference reader: each block allocated anew, ``(units, values)`` float32."""

    def batches():
        for start in range(rows.start, rows.stop, read):
            block = torch.from_numpy(np.asarray(ds[start : min(start + read, rows.stop)],
                                                dtype=np.float32))
            yield block.transpose(0, 1).reshape(block.shape[1], -1)

    return batches


def test_batches_are_the_store_rows_in_unit_major_order(tmp_path, monkeypatch):
    # the reused buffers hold each block until the next: what exact_quantiles sees, block by
    # block, equals _threshold_batches' fresh blocks
    import dissect.netdissect.run as run

    store = _store(tmp_path / "s.h5", _acts(False), "float16")
    seen = []

    def recording(batches, *args, **kwargs):
        seen.extend(batch.clone() for batch in batches())
        return exact_quantiles(batches, *args, **kwargs)

    monkeypatch.setattr(run, "exact_quantiles", recording)
    _thresholds(store, ["layer"], range(ROWS), 0.005, torch.device("cpu"), None)
    plain = list(_fresh_blocks(store["layer"], range(ROWS), 256)())
    assert [tuple(b.shape) for b in seen] == [(UNITS, 256 * H * W), (UNITS, 44 * H * W)]
    for got, want in zip(seen, plain, strict=True):
        assert torch.equal(got, want)


def test_release_free_heap_is_safe_to_call():
    # glibc's malloc_trim where there is one; a no-op elsewhere (never an error)
    import sys

    from dissect.datasets.annotation_cache import _malloc_trim, release_free_heap

    release_free_heap()
    release_free_heap()
    if not sys.platform.startswith("linux"):
        assert _malloc_trim() is None
