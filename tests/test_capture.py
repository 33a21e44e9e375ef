"""capture + ActivationStore: exact data, the schema, refusals, and resume after SIGKILL."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DictImages, TinyCNN
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from dissect import ActivationStore, DissectError, StoreError, capture
from dissect.errors import DataError
from dissect.store import create_store

LAYERS = ["0", "3", "5", "7"]


def _direct(model: torch.nn.Module, x: torch.Tensor, batch: int = 0) -> dict[str, torch.Tensor]:
    """Reference: the layer outputs computed by hand, layer by layer, in the same batches
    (a conv kernel may round differently for another batch size)."""
    if batch:
        parts = [_direct(model, x[i : i + batch]) for i in range(0, len(x), batch)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with torch.no_grad():
        h0 = model[0](x)
        h3 = model[3](model[2](torch.relu(h0)))
        h5 = model[5](torch.relu(h3))
        out = model[7](model[6](h5))
    return {"0": h0, "3": h3, "5": h5, "7": out}


def test_float32_capture_equals_direct_forward(tiny, tmp_path):
    data = DictImages(n=11)
    store = capture(tiny, data, LAYERS, tmp_path / "a.h5", batch_size=4, dtype="float32",
                    progress=False)
    ref = _direct(tiny, data.x, 4)
    assert store.complete and store.layers == LAYERS and len(store) == 11
    for name in LAYERS:
        assert store[name].dtype == np.float32
        np.testing.assert_array_equal(store[name][:], ref[name].numpy())
    np.testing.assert_array_equal(store.index, np.arange(100, 111))


def test_float16_is_fp16_rounding_and_maxima_are_spatial_max(tiny, tmp_path):
    data = DictImages(n=9)
    store = capture(tiny, data, LAYERS, tmp_path / "a.h5", batch_size=4, progress=False)
    ref = _direct(tiny, data.x, 4)
    for name in LAYERS:
        assert store[name].dtype == np.float16
        np.testing.assert_array_equal(store[name][:], ref[name].half().numpy())
    np.testing.assert_array_equal(store.maxima("0"), ref["0"].amax(dim=(2, 3)).numpy())
    np.testing.assert_array_equal(store.maxima("3"), ref["3"].amax(dim=(2, 3)).numpy())
    np.testing.assert_array_equal(store.maxima("7"), ref["7"].numpy())  # (N, C): itself


def test_schema(tiny, tmp_path):
    capture(tiny, DictImages(n=5), ["0", "3"], tmp_path / "a.h5", progress=False, pool="mean")
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f.attrs["format"] == "torch-dissect" and f.attrs["version"] == 1
        for key in ("model", "fingerprint", "n_samples", "complete"):
            assert key in f.attrs
        assert f.attrs["n_samples"] == 5 and bool(f.attrs["complete"])
        assert f["activations/3"].shape == (5, 6) and f["maxima/3"].shape == (5, 6)
        assert f["activations/3"].chunks is not None and f["index"].dtype == np.int64
        assert f["activations/3"].attrs["dtype"] == "float16"
        assert "gradients" not in f


@pytest.mark.parametrize("pool", ["mean", "max", 2, (1, 3)])
def test_pooling(tiny, tmp_path, pool):
    data = DictImages(n=6)
    store = capture(tiny, data, ["0"], tmp_path / "p.h5", dtype="float32", pool=pool,
                    progress=False)
    h0 = _direct(tiny, data.x, 64)["0"]
    expected = {
        "mean": h0.mean(dim=(2, 3)),
        "max": h0.amax(dim=(2, 3)),
        2: F.adaptive_avg_pool2d(h0, 2),
        (1, 3): F.adaptive_avg_pool2d(h0, (1, 3)),
    }[pool]
    np.testing.assert_allclose(store["0"][:], expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(store.maxima("0"), h0.amax(dim=(2, 3)).numpy())


@pytest.mark.parametrize("form", ["tensor", "tuple", "tensordataset", "loader", "dictloader"])
def test_data_forms(tiny, images, tmp_path, form):
    data = {
        "tensor": images,
        "tuple": [(images[i], i % 3) for i in range(len(images))],
        "tensordataset": TensorDataset(images, torch.arange(10)),
        "loader": DataLoader(TensorDataset(images), batch_size=3),
        "dictloader": DataLoader(DictImages(n=10, size=16, seed=1, offset=0), batch_size=4,
                                 collate_fn=lambda items: {
                                     "image": torch.stack([d["image"] for d in items]),
                                     "index": torch.tensor([d["index"] for d in items])}),
    }[form]
    store = capture(tiny, data, "3", tmp_path / "f.h5", dtype="float32", progress=False)
    batch = 3 if form == "loader" else 4 if form == "dictloader" else 64
    np.testing.assert_array_equal(store["3"][:], _direct(tiny, images, batch)["3"].numpy())
    np.testing.assert_array_equal(store.index, np.arange(10))


def test_workers_give_same_data(tiny, tmp_path):
    data = DictImages(n=8)
    a = capture(tiny, data, "3", tmp_path / "a.h5", batch_size=3, progress=False)
    b = capture(tiny, data, "3", tmp_path / "b.h5", batch_size=3, num_workers=2, progress=False)
    np.testing.assert_array_equal(a["3"][:], b["3"][:])
    np.testing.assert_array_equal(a.index, b.index)


def test_gradients_per_sample(tiny, tmp_path):
    data = DictImages(n=5)
    for p in tiny.parameters():
        p.grad = None
    store = capture(tiny, data, ["3"], tmp_path / "g.h5", dtype="float32", grads_for=2,
                    batch_size=2, progress=False)
    assert all(p.grad is None for p in tiny.parameters())
    for i in range(5):
        x = data.x[i : i + 1]
        h3 = tiny[3](tiny[2](torch.relu(tiny[0](x))))
        out = tiny[7](tiny[6](tiny[5](torch.relu(h3))))
        (g,) = torch.autograd.grad(out[0, 2], h3)
        np.testing.assert_allclose(store.gradients("3")[i], g[0].numpy(), rtol=1e-5, atol=1e-7)
    # a callable target works too, and equals the index form
    other = capture(tiny, data, ["3"], tmp_path / "g2.h5", dtype="float32",
                    grads_for=lambda out: out[:, 2], progress=False)
    np.testing.assert_allclose(other.gradients("3")[:], store.gradients("3")[:], rtol=1e-6)


def test_iter_and_pickle(tiny, tmp_path):
    store = capture(tiny, DictImages(n=7), ["0", "3"], tmp_path / "i.h5", progress=False)
    batches = list(store.iter("3", batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1] and batches[0].dtype == torch.float32
    np.testing.assert_array_equal(torch.cat(batches).numpy(), store["3"][:].astype(np.float32))
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone["0"][2:5], store["0"][2:5])
    assert clone.meta["layers"] == ["0", "3"] and clone.complete
    with pytest.raises(StoreError, match="holds: 0, 3"):
        store["7"]
    with pytest.raises(StoreError, match="no gradients"):
        store.gradients("0")


class _Counting(Dataset):
    def __init__(self, x):
        self.x, self.reads = x, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i]


def test_complete_file_is_reused_and_incompatible_files_refused(tiny, images, tmp_path):
    path = tmp_path / "a.h5"
    capture(tiny, images, ["0", "3"], path, progress=False)
    again = _Counting(images)
    capture(tiny, again, ["0", "3"], path, progress=False)
    # complete and compatible: nothing recomputed; only the five rows that identify the data
    # (first, quarter, middle, three-quarter, last) are read to check it is the same data
    assert again.reads == 5
    other = TinyCNN().eval()
    with pytest.raises(StoreError, match="fingerprint"):
        capture(other, images, ["0", "3"], path, progress=False)
    with pytest.raises(StoreError, match="layers"):
        capture(tiny, images, ["0"], path, progress=False)
    with pytest.raises(StoreError, match="dtype"):
        capture(tiny, images, ["0", "3"], path, dtype="float32", progress=False)
    with pytest.raises(StoreError, match="pool"):
        capture(tiny, images, ["0", "3"], path, pool="mean", progress=False)
    with pytest.raises(StoreError, match="n_samples"):
        capture(tiny, images[:4], ["0", "3"], path, progress=False)
    store = capture(other, images, ["0"], path, overwrite=True, progress=False)
    assert store.layers == ["0"] and store.complete


def test_unfinished_file_is_not_complete_and_resume_false_refuses(tiny, images, tmp_path):
    path = tmp_path / "u.h5"
    capture(tiny, images, ["3"], path, progress=False, dtype="float32")
    with h5py.File(path, "r+") as f:  # simulate a capture that stopped after 4 rows
        f.attrs["complete"] = False
        f["progress"][()] = 4
    store = ActivationStore(path)
    assert not store.complete and len(store) == 4 and store.maxima("3").shape == (4, 6)
    assert "INCOMPLETE" in repr(store)
    store.close()
    with pytest.raises(StoreError, match="resume=False"):
        capture(tiny, images, ["3"], path, progress=False, dtype="float32", resume=False)
    counting = _Counting(images)
    store = capture(tiny, counting, ["3"], path, batch_size=3, progress=False, dtype="float32")
    assert counting.reads == 5 + 6 and store.complete  # the 5 identity rows, the 6 missing
    # rows 0-3 come from the first run (one batch of 10), rows 4-9 from the resumed one
    np.testing.assert_array_equal(store["3"][:4], _direct(tiny, images)["3"][:4].numpy())
    np.testing.assert_array_equal(store["3"][4:], _direct(tiny, images[4:], 3)["3"].numpy())


def test_store_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        ActivationStore(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="not a torch-dissect store"):
        ActivationStore(tmp_path / "other.h5")
    create_store(tmp_path / "v2.h5", n=2, layers={"a": (3,)}, dtype="float16", pool=None,
                 attrs={})
    with h5py.File(tmp_path / "v2.h5", "r+") as f:
        f.attrs["version"] = 2
    with pytest.raises(StoreError, match="version 2"):
        ActivationStore(tmp_path / "v2.h5")


def test_foreign_file_at_path_is_refused_unless_overwrite(tiny, images, tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("precious notes")
    with pytest.raises(StoreError, match="overwrite=True"):
        capture(tiny, images, "0", path, progress=False)
    assert path.read_text() == "precious notes"
    assert capture(tiny, images, "0", path, overwrite=True, progress=False).complete


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3, 8, 8)


class _Sized(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "int8"}, "dtype"),
        ({"pool": "median"}, "pool"),
        ({"pool": 0}, "pool"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"grads_for": "cat"}, "grads_for"),
        ({"layers": ["0", "nope"]}, "nope"),
        ({"data": _Sized([])}, "empty"),
        ({"data": _Stream()}, "map-style"),
        ({"data": _Sized(["a", "b"])}, "not a tensor"),
        ({"data": _Sized([{"img": torch.zeros(3, 8, 8)}])}, "'image'"),
        ({"data": _Sized([torch.zeros(3, 8, 8), torch.zeros(3, 9, 9)])}, "different shapes"),
        ({"data": DataLoader(TensorDataset(torch.zeros(4, 3, 8, 8)), shuffle=True)}, "shuffle"),
        ({"device": "cuda:7" if not torch.cuda.is_available() else "nonsense"}, "device|CUDA"),
    ],
)
def test_bad_input_gives_dissect_error_and_no_complete_file(tiny, tmp_path, kwargs, match):
    args = {"data": torch.zeros(4, 3, 8, 8), "layers": ["0"], **kwargs}
    path = tmp_path / "bad.h5"
    with pytest.raises(DissectError, match=match):
        capture(tiny, args.pop("data"), args.pop("layers"), path, progress=False, **args)
    if path.exists():
        assert not ActivationStore(path).complete


def test_shape_change_between_batches_is_refused(tiny, tmp_path):
    loader = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 10, 10)]

    class L(DataLoader):
        pass

    data = L(_Sized([torch.zeros(3, 8, 8)] * 2 + [torch.zeros(3, 10, 10)] * 2), batch_size=2)
    assert len(loader) == 2
    with pytest.raises(DataError, match="one size"):
        capture(tiny, data, ["3"], tmp_path / "s.h5", progress=False)
    assert not ActivationStore(tmp_path / "s.h5").complete


CHILD = textwrap.dedent(
    """
    import sys, time, pathlib, torch
    from torch import nn
    from torch.utils.data import Dataset
    from dissect import capture

    class Slow(Dataset):
        def __init__(self, marker):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(48, 3, 24, 24, generator=g)
            self.marker = marker
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            if self.marker:
                pathlib.Path(self.marker + f".{i}").touch()
                time.sleep(0.02)
            return self.x[i]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    path, marker = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    capture(model, Slow(marker), ["0", "2", "4"], path, batch_size=5, progress=False)
    """
)


def _run_child(script: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, str(script), *args], env=env)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_data(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ref_path = tmp_path / "ref.h5"
    assert _run_child(script, str(ref_path)).wait(timeout=120) == 0
    path = tmp_path / "killed.h5"
    marker = str(tmp_path / "seen")
    rng = np.random.default_rng(0)
    kills = 0
    # kill at several moments: while loading data, computing, or writing a batch
    for item in (3, 12, 26, 40):
        proc = _run_child(script, str(path), marker)
        deadline = time.monotonic() + 60
        while not Path(f"{marker}.{item}").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.05)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if path.exists():  # a killed capture never reads as complete
            with ActivationStore(path) as partial:
                assert partial.complete == (proc.returncode == 0)
                assert len(partial) <= 48
        for p in tmp_path.glob("seen.*"):
            p.unlink()
    assert kills >= 3
    assert _run_child(script, str(path)).wait(timeout=120) == 0
    with ActivationStore(ref_path) as ref, ActivationStore(path) as got:
        assert got.complete and got.meta["fingerprint"] == ref.meta["fingerprint"]
        for layer in ref.layers:
            np.testing.assert_array_equal(got[layer][:], ref[layer][:])
            np.testing.assert_array_equal(got.maxima(layer), ref.maxima(layer))
        np.testing.assert_array_equal(got.index, ref.index)
