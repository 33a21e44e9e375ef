"""Resumable Network Dissection: a run interrupted (an exception, or SIGKILL at several points)
and rerun gives the thresholds and IoU of an uninterrupted run; a checkpoint of another run is
refused with its differences; engine= reaches the tally; top images are streamed exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_netdissect import TinyConcepts, _store

from dissect import DissectError
from dissect.netdissect import dissect, tally
from dissect.netdissect.checkpoint import load_checkpoint
from dissect.stats import top_rows


def _acts(n: int = 40, units: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acts = np.maximum(rng.standard_normal((n, units, 4, 4)), 0).astype(np.float32)
    acts[:, 0] = 0  # a dead unit: threshold 0
    return acts


def _same(a, b) -> None:
    assert a.layers == b.layers
    for layer in a.layers:
        np.testing.assert_array_equal(a.thresholds(layer), b.thresholds(layer))
        np.testing.assert_array_equal(a.iou(layer), b.iou(layer))
        np.testing.assert_array_equal(a.top_images(layer), b.top_images(layer))


class Boom(RuntimeError):
    pass


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    ds = TinyConcepts(40, (8, 8))
    ckpt = tmp_path / "nd.ckpt"
    with _store(tmp_path / "s.h5", _acts()) as store:
        ref = dissect(store, ds, progress=False, batch_size=6)
        calls = {"n": 0}
        add = tally.IoUTally.add

        def failing_add(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th batch fails (a checkpoint was saved after the 2nd)
                raise Boom
            return add(self, *args, **kwargs)

        monkeypatch.setattr(tally.IoUTally, "add", failing_add)
        with pytest.raises(Boom):
            dissect(store, ds, progress=False, batch_size=6, checkpoint=ckpt,
                    checkpoint_every=2)
        monkeypatch.setattr(tally.IoUTally, "add", add)
        assert ckpt.exists()
        saved = torch.load(ckpt, weights_only=False)
        assert saved["position"] == 12  # two batches of 6 were counted and saved
        # resuming skips the threshold pass and the rows already counted
        got = dissect(store, ds, progress=False, batch_size=6, checkpoint=ckpt)
    _same(got, ref)
    assert not ckpt.exists()  # a finished run removes its checkpoint


def test_resume_counts_only_the_remaining_rows(tmp_path, monkeypatch):
    ds = TinyConcepts(30, (6, 6))
    ckpt = tmp_path / "nd.ckpt"
    seen: list[int] = []
    add = tally.IoUTally.add

    def stop_at_third(self, maps, *args, **kwargs):
        if len(seen) == 2:
            raise Boom
        seen.append(len(maps))
        return add(self, maps, *args, **kwargs)

    with _store(tmp_path / "s.h5", _acts(30)) as store:
        ref = dissect(store, ds, progress=False, batch_size=5)
        monkeypatch.setattr(tally.IoUTally, "add", stop_at_third)
        with pytest.raises(Boom):
            dissect(store, ds, progress=False, batch_size=5, checkpoint=ckpt,
                    checkpoint_every=1)
        seen.clear()
        counted: list[int] = []

        def recording(self, maps, *args, **kwargs):
            counted.append(len(maps))
            return add(self, maps, *args, **kwargs)

        monkeypatch.setattr(tally.IoUTally, "add", recording)
        got = dissect(store, ds, progress=False, batch_size=5, checkpoint=ckpt)
    assert sum(counted) == 20  # rows 10-29 only
    _same(got, ref)


def test_checkpoint_of_another_run_is_refused_with_its_differences(tmp_path, monkeypatch):
    ds = TinyConcepts(20, (6, 6))
    ckpt = tmp_path / "nd.ckpt"
    add = tally.IoUTally.add
    monkeypatch.setattr(tally.IoUTally, "add", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    with _store(tmp_path / "s.h5", _acts(20)) as store:
        with pytest.raises(Boom):
            dissect(store, ds, progress=False, checkpoint=ckpt)
        monkeypatch.setattr(tally.IoUTally, "add", add)
        with pytest.raises(DissectError, match=r"(?s)another run.*quantile.*0\.005.*0\.01"):
            dissect(store, ds, progress=False, checkpoint=ckpt, quantile=0.01)
        with pytest.raises(DissectError, match="categories"):
            dissect(store, ds, progress=False, checkpoint=ckpt, categories=["color"])
        with pytest.raises(DissectError, match="area"):
            dissect(store, ds, progress=False, checkpoint=ckpt, area="lite")
        assert ckpt.exists()
        got = dissect(store, ds, progress=False, checkpoint=ckpt, quantile=0.01,
                      overwrite=True)
        ref = dissect(store, ds, progress=False, quantile=0.01)
    _same(got, ref)
    # another store's content (other activations) is another run too
    with _store(tmp_path / "s.h5", _acts(20)) as store:
        monkeypatch.setattr(tally.IoUTally, "add", lambda *a, **k: (_ for _ in ()).throw(Boom()))
        with pytest.raises(Boom):
            dissect(store, ds, progress=False, checkpoint=ckpt)
    with _store(tmp_path / "s.h5", _acts(20, seed=1)) as store:
        monkeypatch.setattr(tally.IoUTally, "add", add)
        with pytest.raises(DissectError, match="store content"):
            dissect(store, ds, progress=False, checkpoint=ckpt)


def test_damaged_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "nd.ckpt"
    ckpt.write_bytes(b"\x00garbage")
    with pytest.raises(DissectError, match="cannot resume.*overwrite=True"):
        load_checkpoint(ckpt, {}, overwrite=False)
    assert load_checkpoint(ckpt, {}, overwrite=True) is None


def test_engine_reaches_the_tally_and_bad_values_are_refused(tmp_path, monkeypatch):
    ds = TinyConcepts(12, (6, 6))
    engines: list[str] = []
    init = tally.IoUTally.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self.engine)

    monkeypatch.setattr(tally.IoUTally, "__init__", spy)
    with _store(tmp_path / "s.h5", _acts(12)) as store:
        a = dissect(store, ds, progress=False, engine="torch")
        b = dissect(store, ds, progress=False, engine="auto")
        with pytest.raises(DissectError, match="engine='fast'"):
            dissect(store, ds, progress=False, engine="fast")
        with pytest.raises(DissectError, match="area='all'"):
            dissect(store, ds, progress=False, area="all")
        with pytest.raises(DissectError, match="checkpoint_every"):
            dissect(store, ds, progress=False, checkpoint_every=0)
    assert engines[0] == "torch"
    _same(a, b)


def test_top_rows_equals_stable_argsort():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, units, k = int(rng.integers(1, 50)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
        v = rng.integers(0, 4, (n, units)).astype(np.float32)
        v[rng.random((n, units)) < 0.1] = np.nan
        v[rng.random((n, units)) < 0.05] = np.inf
        v[rng.random((n, units)) < 0.05] = -np.inf
        ref = np.argsort(-np.where(np.isfinite(v), v, -np.inf), axis=0, kind="stable")[:k].T
        for chunk in (1, 3, 7, None):
            got = top_rows(lambda a, b, v=v: v[a:b], n, units, k, chunk_rows=chunk)
            np.testing.assert_array_equal(got, ref)


def test_top_images_are_read_in_bounded_chunks(tmp_path, monkeypatch):
    from dissect.store import ActivationStore

    ds = TinyConcepts(30, (6, 6))
    reads: list[tuple[int, int | None]] = []
    maxima = ActivationStore.maxima

    def spy(self, layer, start=0, stop=None):
        reads.append((start, stop))
        return maxima(self, layer, start, stop)

    monkeypatch.setattr(ActivationStore, "maxima", spy)
    with _store(tmp_path / "s.h5", _acts(30)) as store:
        got = dissect(store, ds, progress=False, k=4)
        full = maxima(store, "conv")
    ref = np.argsort(-full, axis=0, kind="stable")[:4].T
    np.testing.assert_array_equal(got.top_images("conv"), ref)
    assert all(stop is not None for _, stop in reads)  # never the whole array at once


CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from test_netdissect import TinyConcepts
    from dissect.netdissect import dissect
    from dissect.store import ActivationStore

    class Slow(TinyConcepts):
        def __init__(self, marker):
            super().__init__(48, (8, 8))
            self.marker = marker
        def __getitem__(self, i):
            if self.marker:
                pathlib.Path(self.marker + f".{i}").touch()
                time.sleep(0.01)
            return super().__getitem__(i)

    store_path, marker = sys.argv[1], sys.argv[2]
    with ActivationStore(store_path) as store:
        result = dissect(store, Slow(marker), progress=False, batch_size=4,
                         checkpoint=store_path + ".ckpt", checkpoint_every=1,
                         annotation_cache=False)
    result.to_json(store_path + ".json")
    """
)


@pytest.mark.slow
def test_sigkill_at_several_points_then_rerun_gives_identical_result(tmp_path):
    from dissect.netdissect import DissectionResult

    acts = _acts(48)
    with _store(tmp_path / "s.h5", acts) as store:
        ref = dissect(store, TinyConcepts(48, (8, 8)), progress=False, batch_size=4)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    tests = str(Path(__file__).resolve().parent)
    marker = str(tmp_path / "seen")
    rng = np.random.default_rng(0)
    kills, positions = 0, []
    for item in (2, 13, 27, 41):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s.h5"), marker,
                                 tests], env=env)
        deadline = time.monotonic() + 120
        while not Path(f"{marker}.{item}").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.03)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        ckpt = tmp_path / "s.h5.ckpt"
        if ckpt.exists():
            positions.append(torch.load(ckpt, weights_only=False)["position"])
        for p in tmp_path.glob("seen.*"):
            p.unlink()
    assert kills >= 3
    assert positions == sorted(positions) and positions[-1] > 0  # progress was kept
    done = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s.h5"), "", tests],
                            env=env)
    assert done.wait(timeout=120) == 0
    _same(DissectionResult.from_json(tmp_path / "s.h5.json"), ref)
    assert not (tmp_path / "s.h5.ckpt").exists()


def test_cli_checkpoints_into_its_out_folder(tmp_path, monkeypatch):
    import dissect.netdissect as nd
    from dissect.cli import main

    seen: dict = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise DissectError("stop here")

    monkeypatch.setattr(nd, "dissect", spy)
    out = tmp_path / "nd"
    code = main(["netdissect", "torchvision:resnet18", "--dataset", "synthetic:3",
                 "--layers", "layer4", "--out", str(out), "--batch-size", "3", "--quiet",
                 "--checkpoint-every", "7", "--engine", "torch", "--area", "lite",
                 "--no-annotation-cache"])
    assert code != 0
    assert seen["checkpoint"] == out / "netdissect.ckpt" and seen["checkpoint_every"] == 7
    assert seen["engine"] == "torch" and seen["area"] == "lite"
    assert seen["annotation_cache"] is False and seen["overwrite"] is False
    seen.clear()
    main(["netdissect", "torchvision:resnet18", "--dataset", "synthetic:3", "--layers", "layer4",
          "--out", str(tmp_path / "nd2"), "--quiet", "--restart",
          "--annotation-cache", str(tmp_path / "c")])
    assert seen["overwrite"] is True and seen["annotation_cache"] == tmp_path / "c"
