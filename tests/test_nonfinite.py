"""Non-finite activations (NaN, +inf, -inf) never wipe a layer out: known answers.

The issue's scenario: 20 images, a 4x4 patch of NaN (or +inf, or -inf) in 2 of them, in the
map of a unit planted to detect "red". Thresholds are numpy.nanquantile of the finite values,
pixels whose upsampled value is not finite are never active, clean units keep their IoU, the
planted unit stays a detector, both engines count the same, and one warning names the layer,
the count and the rows.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dissect._plumbing.finite import NonFiniteTally, merged_tallies, nonfinite_summary
from dissect.datasets import SyntheticConcepts
from dissect.datasets.concepts import collate
from dissect.datasets.synthetic import PALETTE
from dissect.distributed import DistContext
from dissect.netdissect import DissectionResult, IoUTally, dissect
from dissect.netdissect.active_pixels import active_mask_dense
from dissect.netdissect.unit_masks import active_mask
from dissect.stats import exact_quantiles
from dissect.store import ActivationStore, StoreWriter, create_store

N, SIZE, QUANTILE = 20, 32, 0.5
ROWS = (3, 17)  # the images holding the patch
RED = 0  # the planted unit
MESSAGE = ("layer 'conv': 32 non-finite activation values ({split}) in rows 3, 17: thresholds "
           "are quantiles of the finite values and non-finite values are never active")


@pytest.fixture(scope="module")
def ds() -> SyntheticConcepts:
    return SyntheticConcepts(N, size=SIZE, seed=4)


@pytest.fixture(scope="module")
def clean(ds) -> np.ndarray:
    """``(N, 4, 32, 32)`` maps: 1 + red, green, blue indicators (exact palette matches), and a
    noise unit."""
    images = torch.stack([ds[i]["image"] for i in range(N)])
    colors = torch.tensor([PALETTE[c] for c in ("red", "green", "blue")]) / 255.0
    match = ((images[:, None] - colors[None, :, :, None, None]).abs().amax(dim=2) < 0.02)
    noise = torch.randn(N, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return torch.cat([1.0 + match.float(), noise], dim=1).numpy()


def _patched(clean: np.ndarray, value: float) -> np.ndarray:
    """The 4x4 patch in the red unit of images 3 and 17, on red pixels where there are any."""
    acts = clean.copy()
    for row in ROWS:
        ys, xs = np.nonzero(acts[row, RED] > 1.5)
        y, x = (int(ys.mean()) - 2, int(xs.mean()) - 2) if len(ys) else (8, 8)
        y, x = min(max(y, 0), SIZE - 4), min(max(x, 0), SIZE - 4)
        acts[row, RED, y : y + 4, x : x + 4] = value
    return acts


def _store(path, layers: dict[str, np.ndarray], dtype: str = "float32") -> ActivationStore:
    n = len(next(iter(layers.values())))
    create_store(path, n=n, layers={k: v.shape[1:] for k, v in layers.items()}, dtype=dtype,
                 pool=None, attrs={})
    with StoreWriter(path) as w:
        stored = {k: v.astype(dtype) for k, v in layers.items()}
        w.write(0, np.arange(n), stored,
                {k: v.astype(np.float32).max(axis=(2, 3)) for k, v in stored.items()})
        w.finish()
    return ActivationStore(path)


def _nanquantile_of_finite(values: np.ndarray, level: float) -> np.ndarray:
    """The reference thresholds: numpy.nanquantile of each row's finite values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        return np.nanquantile(np.where(np.isfinite(values), values, np.nan), level, axis=1)


def _dense_iou(acts: np.ndarray, ds, thr: np.ndarray) -> np.ndarray:
    """Per image, per unit, per concept over dense masks: a pixel is active when its
    upsampled value is finite and above the threshold."""
    K = acts.shape[1]
    concepts = [c for c in ds.concepts if c.number != 0]
    cats = list(ds.categories)
    inter = np.zeros((K, len(concepts)), dtype=np.int64)
    act_area = np.zeros((K, len(cats)), dtype=np.int64)
    area = np.zeros(len(concepts), dtype=np.int64)
    for i in range(len(acts)):
        item = ds[i]
        seg = tuple(item["pixel_labels"].shape[-2:])
        up = F.interpolate(torch.from_numpy(acts[i : i + 1]).float(), size=seg,
                           mode="bilinear", align_corners=False)[0].numpy()
        active = np.isfinite(up) & (up > thr.astype(np.float32)[:, None, None])
        for j, c in enumerate(concepts):
            if c.number in item["image_labels"].tolist():
                mask = np.ones(seg, dtype=bool)
            else:
                mask = (item["pixel_labels"].numpy() == c.number).any(axis=0)
            area[j] += mask.sum()
            inter[:, j] += (active & mask).sum(axis=(1, 2))
        for g in range(len(cats)):
            if item["annotated"][g]:
                act_area[:, g] += active.sum(axis=(1, 2))
    cat_of = [cats.index(c.category) for c in concepts]
    union = act_area[:, cat_of] + area[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "non-finite" in r.getMessage()]


@pytest.mark.parametrize("value, split", [(np.nan, "NaN 32"), (np.inf, "+inf 32"),
                                          (-np.inf, "-inf 32")])
def test_patch_in_two_images_leaves_the_layer_intact(tmp_path, ds, clean, value, split, caplog):
    acts = _patched(clean, value)
    store = _store(tmp_path / "patched.h5", {"conv": acts, "clean": clean})
    with caplog.at_level(logging.WARNING, logger="dissect"):
        res = dissect(store, ds, quantile=QUANTILE, batch_size=6, progress=False)
    # thresholds: numpy.nanquantile of each unit's finite values, bit for bit
    flat = acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1)
    expected = _nanquantile_of_finite(flat, 1 - QUANTILE).astype(np.float32)
    np.testing.assert_array_equal(res.thresholds("conv"), expected)
    assert np.isfinite(res.thresholds("conv")).all()
    # clean units are unchanged against the store without the patch
    ref = dissect(_store(tmp_path / "clean.h5", {"conv": clean}), ds, quantile=QUANTILE,
                  batch_size=6, progress=False)
    np.testing.assert_array_equal(res.thresholds("conv"), ref.thresholds("conv"))
    np.testing.assert_array_equal(res.iou("conv")[1:], ref.iou("conv")[1:])
    np.testing.assert_array_equal(res.iou("clean"), ref.iou("conv"))
    # the patched unit: the dense reference, where the patch's pixels are never active
    dense = _dense_iou(acts, ds, res.thresholds("conv"))
    np.testing.assert_array_equal(res.iou("conv"), dense)
    red = [c.name for c in res.concepts].index("red")
    assert ref.iou("conv")[RED, red] == 1.0  # exact masks without the patch ...
    assert res.iou("conv")[RED, red] < 1.0  # ... the patch's red pixels are no longer active
    # the summary still counts the detector
    units = res.units("conv")
    assert (units[RED].concept, units[RED].is_detector) == ("red", True)
    assert len(res.detectors("conv")) == len(ref.detectors("conv"))
    assert "non-finite activation values" in res.summary() and "conv 32" in res.summary()
    # one warning, for the patched layer only, naming the count, its kind and the rows
    assert _warnings(caplog) == [MESSAGE.format(split=split)]
    assert res.meta["nonfinite"] == {"conv": 32, "clean": 0}
    again = DissectionResult.from_json(res.to_json(tmp_path / "r.json"))
    assert again.meta["nonfinite"] == {"conv": 32, "clean": 0}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_both_engines_count_the_same_as_the_dense_reference(tmp_path, ds, clean, value):
    acts = _patched(clean, value)
    store = _store(tmp_path / "s.h5", {"conv": acts})
    res = dissect(store, ds, quantile=QUANTILE, batch_size=6, progress=False)
    thr = torch.from_numpy(res.thresholds("conv").astype(np.float32))
    concepts = [c for c in ds.concepts if c.number != 0]
    tallies = {e: IoUTally(acts.shape[1], concepts, ds.categories, engine=e)
               for e in ("numba", "torch")}
    for start in range(0, N, 7):
        item = collate([ds[i] for i in range(start, min(start + 7, N))])
        maps = torch.from_numpy(acts[start : start + 7])
        for tally in tallies.values():
            tally.add(maps, thr, item["pixel_labels"], item["image_labels"], item["annotated"])
    numba_state, torch_state = (tallies[e].state_dict() for e in ("numba", "torch"))
    for key in numba_state:
        assert torch.equal(numba_state[key], torch_state[key]), key
    for tally in tallies.values():
        np.testing.assert_array_equal(tally.result(), res.iou("conv"))


def test_float16_store(tmp_path, ds, clean, caplog):
    acts = _patched(clean, np.nan)
    acts[5, 2, 0, :3] = np.inf  # and three infinities elsewhere
    store = _store(tmp_path / "h.h5", {"conv": acts}, dtype="float16")
    with caplog.at_level(logging.WARNING, logger="dissect"):
        res = dissect(store, ds, quantile=QUANTILE, batch_size=6, progress=False)
    stored = store["conv"][:]
    flat = stored.transpose(1, 0, 2, 3).reshape(stored.shape[1], -1)
    expected = _nanquantile_of_finite(flat, 1 - QUANTILE)
    assert res.thresholds("conv").dtype == np.float16
    np.testing.assert_array_equal(res.thresholds("conv"), expected)
    np.testing.assert_array_equal(res.iou("conv"),
                                  _dense_iou(stored.astype(np.float32), ds, expected))
    assert _warnings(caplog) == [
        "layer 'conv': 35 non-finite activation values (NaN 32, +inf 3) in rows 3, 5, 17: "
        "thresholds are quantiles of the finite values and non-finite values are never active"]
    assert res.meta["nonfinite"] == {"conv": 35}


def test_unit_without_a_finite_value_is_never_a_detector(tmp_path, ds, clean, caplog):
    acts = np.concatenate([clean, clean[:, :1]], axis=1)  # unit 4: a copy of red ...
    acts[:, 4] = np.nan  # ... all NaN
    store = _store(tmp_path / "u.h5", {"conv": acts})
    with caplog.at_level(logging.WARNING, logger="dissect"):
        res = dissect(store, ds, quantile=QUANTILE, batch_size=6, progress=False)
    thr = res.thresholds("conv")
    assert thr[4] == np.inf and np.isfinite(thr[:4]).all()
    assert (res.iou("conv")[4] == 0).all()
    assert not res.units("conv")[4].is_detector
    assert res.units("conv")[RED].is_detector
    (message,) = _warnings(caplog)
    assert message.startswith(f"layer 'conv': {N * SIZE * SIZE} non-finite activation values "
                              f"(NaN {N * SIZE * SIZE}) in rows 0, 1, 2, 3, 4 and 15 more: ")
    assert message.endswith("; unit 4 has no finite value at all (threshold +inf: never active, "
                            "never a detector)")
    again = DissectionResult.from_json(res.to_json(tmp_path / "r.json"))
    assert again.thresholds("conv")[4] == np.inf


def test_top_images_rank_non_finite_maxima_last(tmp_path, ds, clean):
    acts = _patched(clean, np.inf)
    res = dissect(_store(tmp_path / "t.h5", {"conv": acts}), ds, quantile=QUANTILE,
                  batch_size=6, progress=False, k=N)
    assert list(res.top_images("conv")[RED, -2:]) == list(ROWS)


# --------------------------------------------------------------------------- several ranks


class _Group:
    """An in-process stand-in for a process group: one thread per rank."""

    def __init__(self, world: int) -> None:
        self.slots: list = [None] * world
        self.sync = threading.Barrier(world, timeout=60)

    def exchange(self, rank: int, obj: Any) -> list:
        self.slots[rank] = obj
        self.sync.wait()
        out = list(self.slots)
        self.sync.wait()
        return out


@dataclass
class _ThreadContext(DistContext):
    group: Any = None

    def barrier(self, step: str) -> None:
        self.group.sync.wait()

    def gather(self, step: str, obj: Any) -> list[Any]:
        return self.group.exchange(self.rank, obj)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.group.exchange(self.rank, tensor.clone())).sum(dim=0)


def test_ranks_merge_counts_and_rows_and_only_rank_0_warns(tmp_path, ds, clean, caplog):
    acts = _patched(clean, np.nan)
    store_path = tmp_path / "d.h5"
    _store(store_path, {"conv": acts}).close()
    single = dissect(ActivationStore(store_path), ds, quantile=QUANTILE, batch_size=4,
                     progress=False)
    caplog.clear()
    world = 2
    group = _Group(world)
    got: list = [None] * world
    errors: list = []

    def rank_body(r: int) -> None:
        ctx = _ThreadContext(r, world, 0, "gloo", group=group)
        try:
            with ActivationStore(store_path) as store:
                got[r] = dissect(store, ds, quantile=QUANTILE, batch_size=4, progress=False,
                                 device="cpu", distributed=ctx)
        except Exception as exc:  # reported below
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="dissect"):
        threads = [threading.Thread(target=rank_body, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    for res in got:  # the patch of row 17 is on rank 1's shard; every rank knows both rows
        np.testing.assert_array_equal(res.thresholds("conv"), single.thresholds("conv"))
        np.testing.assert_array_equal(res.iou("conv"), single.iou("conv"))
        assert res.meta["nonfinite"] == {"conv": 32}
    assert _warnings(caplog) == [MESSAGE.format(split="NaN 32")]


# --------------------------------------------------------------------------- exact_quantiles


def _sprinkled(dtype: str, rows: int = 8, width: int = 997, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, width)).astype(dtype)
    data[1] = np.maximum(data[1], 0)  # ReLU-like ties at zero
    for r in range(2, rows):
        holes = rng.random(width) < 0.1 * r
        data[r, holes] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=dtype),
                                    size=int(holes.sum()))
    data[3, :50] = np.inf  # many infinities above every finite value
    data[rows - 2] = np.nan  # no finite value
    data[rows - 2, :5] = [np.inf, -np.inf, np.nan, np.inf, -np.inf]
    data[rows - 1] = np.nan
    data[rows - 1, 17] = 2.5  # exactly one finite value
    return data


def _batches(data: np.ndarray, width: int):
    starts = range(0, data.shape[1], width)
    return lambda: (torch.from_numpy(data[:, i : i + width]) for i in starts)


def _expected(data: np.ndarray, level: float) -> np.ndarray:
    out = np.full(len(data), np.inf, dtype=data.dtype)
    for r, row in enumerate(data):
        finite = row[np.isfinite(row)]
        if len(finite):
            out[r] = np.quantile(finite, level)
    has = np.isfinite(data).any(axis=1)
    np.testing.assert_array_equal(out[has], _nanquantile_of_finite(data, level)[has])
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("memory", [10**9, 1])  # the top-values path; the radix path
@pytest.mark.parametrize("level", [0.995, 0.5, 0.0, 1.0, 0.9])
def test_exact_quantiles_equal_nanquantile_of_finite_values(dtype, memory, level):
    data = _sprinkled(dtype, seed=int(level * 1000))
    got, bad = exact_quantiles(_batches(data, 100), len(data), data.shape[1], level,
                               dtype=dtype, memory_values=memory, return_nonfinite=True)
    expected = _expected(data, level)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(bad, (~np.isfinite(data)).sum(axis=1))
    assert got[-2] == np.inf and got[-1] == np.float32(2.5)


@pytest.mark.parametrize("memory", [10**9, 1])
def test_exact_quantiles_warns_unless_the_caller_reports(memory, caplog):
    data = _sprinkled("float32", rows=4)
    with caplog.at_level(logging.WARNING, logger="dissect"):
        exact_quantiles(_batches(data, 300), 4, data.shape[1], 0.9, memory_values=memory,
                        return_nonfinite=True)
        assert not caplog.records
        exact_quantiles(_batches(data, 300), 4, data.shape[1], 0.9, memory_values=memory)
    (record,) = caplog.records
    bad = int((~np.isfinite(data)).sum())
    assert record.getMessage() == (
        f"exact_quantiles: {bad} non-finite values in 2 of 4 rows were left out (quantiles of "
        "the finite values); row 2 has no finite value: its quantile is +inf")


class _ThreadRank:
    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank = group, rank

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.group.exchange(self.rank, tensor.clone())).sum(dim=0)


@pytest.mark.parametrize("memory", [10**9, 1])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_quantiles_across_ranks(memory, world, dtype):
    data = _sprinkled(dtype, seed=world)
    data[2, : data.shape[1] // 2] = np.nan  # the first rank(s) hold no finite value of row 2
    group = _Group(world)
    got: list = [None] * world

    def rank_body(r: int) -> None:
        cols = np.array_split(np.arange(data.shape[1]), world)[r]
        part = data[:, cols[0] : cols[-1] + 1]
        got[r] = exact_quantiles(_batches(part, 64), len(data), data.shape[1], 0.98,
                                 dtype=dtype, memory_values=memory,
                                 collective=_ThreadRank(group, r), return_nonfinite=True)

    threads = [threading.Thread(target=rank_body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = _expected(data, 0.98)
    for quantiles, bad in got:
        np.testing.assert_array_equal(quantiles, expected)
        np.testing.assert_array_equal(bad, (~np.isfinite(data)).sum(axis=1))


def test_exact_quantiles_refuses_a_wrong_n():
    data = np.zeros((2, 10), dtype=np.float32)
    with pytest.raises(Exception, match="not n=12"):
        exact_quantiles(_batches(data, 4), 2, 12, 0.5)


# --------------------------------------------------------------------------- the tally


def test_tally_message_split_rows_and_units():
    values = np.zeros((10, 3, 2, 2), dtype=np.float32)
    values[2, 0, 0, 0] = np.nan
    values[6, 1] = np.inf
    values[9, 0, 1, 1] = -np.inf
    tally = NonFiniteTally("layer4.1")
    assert tally.add(values[:5], 100) == 1
    assert tally.add(values[5:], 105) == 5
    s = tally.summary()
    assert (s.total, s.nan, s.posinf, s.neginf, s.values) == (6, 1, 4, 1, 120)
    assert (s.rows, s.n_rows, s.empty_units) == ((102, 106, 109), 3, ())
    assert s.message() == (
        "layer 'layer4.1': 6 non-finite activation values (NaN 1, +inf 4, -inf 1) in rows 102, "
        "106, 109: thresholds are quantiles of the finite values and non-finite values are "
        "never active")


def test_tally_names_five_rows_and_the_units_without_a_finite_value(caplog):
    values = torch.zeros(12, 4, 3)
    values[:, 1] = float("nan")
    values[:, 3] = float("inf")
    tally = NonFiniteTally("x")
    for start in range(0, 12, 5):  # batches of 5, 5, 2
        tally.add(values[start : start + 5], start)
    with caplog.at_level(logging.WARNING, logger="dissect"):
        assert tally.warn() is not None
    (record,) = caplog.records
    assert record.name == "dissect"
    assert record.getMessage() == (
        "layer 'x': 72 non-finite activation values (NaN 36, +inf 36) in rows 0, 1, 2, 3, 4 "
        "and 7 more: thresholds are quantiles of the finite values and non-finite values are "
        "never active; units 1, 3 have no finite value at all (threshold +inf: never active, "
        "never a detector)")


def test_tally_is_silent_and_cheap_on_finite_values(caplog):
    tally = NonFiniteTally("x")
    huge = np.full((4, 2, 8, 8), 3e38, dtype=np.float32)  # the sum overflows; no value does
    assert tally.add(huge, 0) == 0
    assert tally.add(np.full((3, 2), 60000, dtype=np.float16), 4) == 0  # float16 sum overflows
    assert tally.add(np.arange(6).reshape(3, 2), 7) == 0  # integers
    with caplog.at_level(logging.WARNING, logger="dissect"):
        assert tally.warn() is None
    assert not caplog.records and not tally.summary()
    assert tally.summary().total == 0


def test_tally_rows_given_per_value_merge_and_state():
    a, b = NonFiniteTally("x"), NonFiniteTally("x")
    va = np.zeros((3, 2)), np.zeros((2, 2))
    va[0][1, 1] = np.nan
    va[1][0, 0] = np.inf
    a.add(va[0], [40, 41, 42])
    b.add(va[1], np.array([7, 9]))
    merged = merged_tallies([a.state_dict(), b.state_dict()])
    s = merged.summary()
    assert (s.total, s.nan, s.posinf, s.rows, s.n_rows, s.values) == (2, 1, 1, (7, 41), 2, 10)
    restored = NonFiniteTally("y")
    restored.load_state_dict(a.state_dict())
    restored.merge(b)
    assert restored.summary() == s
    one = nonfinite_summary("x", np.concatenate(va), [40, 41, 42, 7, 9])
    assert (one.total, one.rows, one.n_rows) == (2, (7, 41), 2)


def test_unit_masks_never_mark_non_finite_pixels():
    amap = np.zeros((4, 4), dtype=np.float32)
    amap[1, 1] = np.inf
    up = F.interpolate(torch.from_numpy(amap)[None, None], size=(8, 8), mode="bilinear",
                       align_corners=False)[0, 0]
    mask = active_mask(amap, -1.0, (8, 8))
    assert (up > -1.0).numpy()[~mask].any()  # the plain comparison would mark +inf pixels
    np.testing.assert_array_equal(
        mask, active_mask_dense(torch.from_numpy(amap)[None, None], torch.tensor([-1.0]),
                                (8, 8))[0, 0].numpy())
    assert not mask[~np.isfinite(up.numpy())].any()


@pytest.mark.parametrize("memory", [10**9, 1])
def test_threshold_pass_notes_the_rows_of_every_block(tmp_path, clean, memory):
    # dissect's threshold pass in blocks of 3 rows, on both paths of exact_quantiles: only the
    # blocks holding a non-finite value reach the tally, and it still names the right rows
    from dissect.netdissect.run import _note_rows, _threshold_batches

    acts = _patched(clean, np.nan)
    acts[11, 3, 0, 0] = -np.inf
    store = _store(tmp_path / "b.h5", {"conv": acts})
    rows, ds = range(2, 19), store["conv"]
    units, h, w = ds.shape[1:]
    tally, seen = NonFiniteTally("conv"), []

    def note(i, batch):
        seen.append(i)
        _note_rows(tally, rows, 3, (units, h, w))(i, batch)

    thr, bad = exact_quantiles(_threshold_batches(ds, rows, 3), units, len(rows) * h * w, 0.9,
                               memory_values=memory, return_nonfinite=True, on_nonfinite=note)
    tally.add_finite(len(rows) - tally.seen_rows, units, h * w)
    assert seen == [0, 3, 5]  # rows 2-4, 11-13, 17-19
    s = tally.summary()
    assert (s.total, s.nan, s.neginf, s.rows, s.n_rows) == (33, 32, 1, (3, 11, 17), 3)
    assert s.values == len(rows) * units * h * w and s.empty_units == ()
    np.testing.assert_array_equal(bad, [32, 0, 0, 1])
    part = acts[2:19].transpose(1, 0, 2, 3).reshape(units, -1)
    np.testing.assert_array_equal(thr, _nanquantile_of_finite(part, 0.9).astype(np.float32))


def test_add_finite_keeps_per_unit_totals():
    tally = NonFiniteTally("x")
    bad = np.zeros((2, 3, 4), dtype=np.float32)
    bad[:, 2] = np.nan  # unit 2 is NaN in these two rows ...
    tally.add(bad, 0)
    assert tally.summary().empty_units == (2,)
    tally.add_finite(5, 3, 4)  # ... and finite in five more rows checked elsewhere
    s = tally.summary()
    assert (s.empty_units, s.n_empty_units, s.values, s.total) == ((), 0, 7 * 12, 8)
    fresh = NonFiniteTally("y")
    fresh.add_finite(4, 3, 4)
    fresh.add(bad, 4)
    assert fresh.summary().values == 6 * 12 and fresh.summary().empty_units == ()
