"""Multi-process runs: sharding, exact threshold merging, and torchrun on CPU (gloo) giving the
same store and the same dissection as one process; a dying rank fails the others quickly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _dist_worker import (
    CAPTURE_BATCH,
    CLI_ARGS,
    DISSECT_BATCH,
    LAYERS,
    QUANTILE,
    N,
    build_data,
    build_model,
)

from dissect import ActivationStore, StoreError
from dissect.cli import main as cli_main
from dissect.distributed import (
    DistContext,
    DistributedError,
    consolidate,
    resolve,
    shard_dir,
    shard_range,
)
from dissect.hooks import capture
from dissect.netdissect import DissectionResult, dissect
from dissect.stats import exact_quantiles

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_dist_worker.py"


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 22, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("align", [1, 4, 5])
def test_shards_are_contiguous_ordered_balanced_and_batch_aligned(n, world, align):
    ranges = [shard_range(n, world, r, align) for r in range(world)]
    assert [i for r in ranges for i in r] == list(range(n))  # concatenate in dataset order
    nonempty = [r for r in ranges if r]
    assert all(r.start % align == 0 for r in nonempty)
    assert all(len(r) % align == 0 for r in nonempty[:-1])  # batches never straddle ranks
    blocks = [-(-len(r) // align) for r in ranges]
    assert max(blocks) - min(blocks) <= 1  # balanced to one batch
    assert blocks == sorted(blocks, reverse=True)  # the extra batches go to the first ranks


def test_shard_examples_uneven_and_world_larger_than_data():
    assert [len(shard_range(10, 3, r)) for r in range(3)] == [4, 3, 3]
    assert [shard_range(2, 4, r) for r in range(4)] == [range(0, 1), range(1, 2), range(2, 2),
                                                        range(2, 2)]
    assert [shard_range(22, 2, r, align=4) for r in range(2)] == [range(0, 12), range(12, 22)]
    with pytest.raises(Exception, match="bad sharding"):
        shard_range(5, 2, 2)


def test_single_process_needs_no_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert resolve(None) is None and resolve(False) is None
    with pytest.raises(DistributedError, match="torchrun"):
        resolve(True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert resolve(None) is None  # torchrun --nproc_per_node=1 is a plain run


# --------------------------------------------------------------------------- threshold merge


class ThreadGroup:
    """An in-process stand-in for a process group: one thread per rank, exact collectives."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.slots: list = [None] * world_size
        self.sync = threading.Barrier(world_size, timeout=30)

    def rank(self, r: int) -> ThreadRank:
        return ThreadRank(self, r)


class ThreadRank:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.rank] = tensor.clone()
        self.group.sync.wait()
        out = list(self.group.slots)
        self.group.sync.wait()
        return out

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(tensor)).sum(dim=0)


@pytest.mark.parametrize("memory", [10**9, 1])  # per-rank top-k + bisection; radix histograms
@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("width, level", [(613, 0.98), (613, 0.5), (10, 0.9)])  # 10: idle ranks
def test_threshold_merge_equals_numpy_quantile(memory, world, dtype, width, level):
    rng = np.random.default_rng(world)
    data = rng.standard_normal((4, width)).astype(dtype)
    data[1] = np.maximum(data[1], 0)  # ReLU-like ties at zero
    data[2] = 1.5  # all equal
    data[3, width // 2 :] = 40.0  # the top values all on the last ranks
    group = ThreadGroup(world)
    got: list = [None] * world

    def rank_body(r: int) -> None:
        cols = shard_range(data.shape[1], world, r, align=7)

        def batches():
            for s in range(cols.start, cols.stop, 50):
                yield torch.from_numpy(data[:, s : min(s + 50, cols.stop)])

        got[r] = exact_quantiles(batches, 4, data.shape[1], level, dtype=dtype,
                                 memory_values=memory, collective=group.rank(r))

    threads = [threading.Thread(target=rank_body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = np.quantile(data, level, axis=1)
    for r in range(world):
        assert got[r].dtype == expected.dtype
        np.testing.assert_array_equal(got[r], expected)


# --------------------------------------------------------------------------- torchrun


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _run_torchrun(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", str(WORKER), "run", str(out)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory) -> Path:
    """One torchrun launch (2 CPU ranks, gloo) doing everything the worker checks."""
    out = tmp_path_factory.mktemp("dist")
    proc = _run_torchrun(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same work in this single process."""
    tmp = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)  # the ranks ran with one thread each; results do not depend on it
    model, data = build_model(), build_data()
    store = capture(model, data, LAYERS, tmp / "acts.h5", batch_size=CAPTURE_BATCH,
                    dtype="float32", device="cpu", progress=False, distributed=False)
    result = dissect(store, data, LAYERS, quantile=QUANTILE, batch_size=DISSECT_BATCH,
                     device="cpu", progress=False, distributed=False)
    return store, result


def _assert_same_store(got: ActivationStore, ref: ActivationStore) -> None:
    assert got.complete and got.n_samples == ref.n_samples == len(got) == N
    assert got.layers == ref.layers
    for key in ("fingerprint", "model", "layers", "dtype", "pool", "gradients", "n_samples"):
        assert got.meta[key] == ref.meta[key], key
    for layer in ref.layers:
        assert got[layer].shape == ref[layer].shape and got[layer].dtype == ref[layer].dtype
        np.testing.assert_array_equal(got[layer][:], ref[layer][:])
        np.testing.assert_array_equal(got.maxima(layer), ref.maxima(layer))
        batches = [b.numpy() for b in got.iter(layer, batch_size=5)]
        np.testing.assert_array_equal(np.concatenate(batches), ref[layer][:])
    np.testing.assert_array_equal(got.index, ref.index)
    np.testing.assert_array_equal(got.index, np.arange(N))


@pytest.mark.slow
def test_torchrun_store_equals_single_process(torchrun_out, reference):
    ref, _ = reference
    path = torchrun_out / "acts.h5"  # the published store after a crash of shard 1 and resume
    with ActivationStore(path) as got:
        _assert_same_store(got, ref)
        assert json.loads(got.meta["shards"]) == ["acts.h5.shards/rank00000-of-00002.h5",
                                                  "acts.h5.shards/rank00001-of-00002.h5"]
        with h5py.File(path, "r") as f:
            assert f["activations/0"].is_virtual and f["index"].is_virtual
    with ActivationStore(torchrun_out / "standalone.h5") as copy:  # consolidate()
        _assert_same_store(copy, ref)
        assert not copy._file["activations/0"].is_virtual
    with ActivationStore(shard_dir(path) / "rank00001-of-00002.h5") as shard:
        assert shard.n_samples == 10 and shard.complete  # rows 12..21: three batches of 4
        np.testing.assert_array_equal(shard.index, np.arange(12, 22))


@pytest.mark.slow
def test_torchrun_dataloader_sources(torchrun_out, reference):
    ref, _ = reference
    with ActivationStore(torchrun_out / "loader.h5") as got:  # sequential: same batches
        _assert_same_store(got, ref)
    with ActivationStore(torchrun_out / "sampler.h5") as got:  # shard cut inside a batch
        for layer in LAYERS:
            np.testing.assert_allclose(got[layer][:], ref[layer][:], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.index, np.arange(N))


@pytest.mark.slow
def test_torchrun_dissection_equals_single_process(torchrun_out, reference):
    _, ref = reference
    for rank in (0, 1):  # every rank returns the same result
        got = DissectionResult.from_json(torchrun_out / f"result-rank{rank}.json")
        assert got.layers == ref.layers and got.concepts == ref.concepts
        for layer in LAYERS:
            np.testing.assert_array_equal(got.thresholds(layer), ref.thresholds(layer))
            np.testing.assert_array_equal(got.iou(layer), ref.iou(layer))
            np.testing.assert_array_equal(got.top_images(layer), ref.top_images(layer))
        assert got.units(LAYERS[0]) == ref.units(LAYERS[0])
    store, _ = reference
    values = store["0"][:].transpose(1, 0, 2, 3).reshape(store["0"].shape[1], -1)
    expected = np.quantile(values, 1 - QUANTILE, axis=1)
    np.testing.assert_array_equal(ref.thresholds("0"), expected)
    for rank in (0, 1):  # the radix (bounded memory) merge over gloo
        np.testing.assert_array_equal(np.load(torchrun_out / f"radix-rank{rank}.npy"), expected)


@pytest.mark.slow
def test_torchrun_resume_per_shard_and_reuse(torchrun_out):
    reports = [json.loads((torchrun_out / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    # shard 0 was complete (nothing recomputed); shard 1 had 4 of its 10 rows: 6 recomputed;
    # each rank also reads the 5 rows that identify the data, to check it is the same data
    assert [r["resume_reads"] for r in reports] == [5, 5 + 6]
    assert all(r["resumed_complete"] for r in reports)
    assert [r["reuse_reads"] for r in reports] == [5, 5]  # reused; only the identity rows read
    assert "publish" in reports[0]["timings"] and "count reduction" in reports[0]["timings"]


@pytest.mark.slow
def test_torchrun_an_error_on_one_rank_is_raised_on_all(torchrun_out):
    reports = [json.loads((torchrun_out / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[1]["broken"].startswith("DataError: the input of a data item is a str")
    assert reports[0]["broken"].startswith("DistributedError: capture of the shards of")
    assert "failed on rank 1: DataError" in reports[0]["broken"]
    assert not (torchrun_out / "broken.h5").exists()


@pytest.mark.slow
def test_torchrun_cli_writes_once_and_equals_single_process(torchrun_out, tmp_path, capsys):
    reports = [json.loads((torchrun_out / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["cli_code"] for r in reports] == [0, 0]
    assert "detectors" in reports[0]["cli_stdout"] and reports[1]["cli_stdout"] == ""
    spec = f"{WORKER}:build_model"
    assert cli_main(["netdissect", spec, *CLI_ARGS, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    got = json.loads((torchrun_out / "cli" / "netdissect.json").read_text())
    ref = json.loads((tmp_path / "netdissect.json").read_text())
    assert got["layers"] == ref["layers"]
    assert (torchrun_out / "cli" / "activations.h5.shards").is_dir()


@pytest.mark.slow
def test_missing_shard_is_refused_not_read_as_zeros(torchrun_out, tmp_path):
    import shutil

    moved = tmp_path / "moved"  # the folder moves as a whole: relative shard paths still work
    shutil.copytree(torchrun_out, moved, ignore=shutil.ignore_patterns("cli"))
    with ActivationStore(moved / "acts.h5") as store:
        assert store.complete and float(np.abs(store["3"][:]).sum()) > 0
    (shard_dir(moved / "acts.h5") / "rank00001-of-00002.h5").unlink()
    with pytest.raises(StoreError, match="missing"):
        ActivationStore(moved / "acts.h5")
    with pytest.raises(StoreError, match="overwrite"):
        consolidate(torchrun_out / "acts.h5", torchrun_out / "standalone.h5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_dying_rank_makes_the_others_fail_with_a_clear_error(tmp_path):
    """Rank 1 joins and exits; rank 0 (the capture command) must fail fast, not hang.

    The ranks are started by hand, as a scheduler (e.g. srun) would, since torchrun itself would
    kill the survivors on the first failure.
    """
    port = str(_free_port())
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    survivor = subprocess.Popen(
        [sys.executable, "-m", "dissect", "capture", f"{WORKER}:build_model", "--data",
         "synthetic:8", "--layers", "0", "--out", str(tmp_path / "a.h5"), "--quiet",
         "--device", "cpu", "--dist-timeout", "0.5"],
        env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    dying = subprocess.Popen([sys.executable, str(WORKER), "die"],
                             env={**env, "RANK": "1", "LOCAL_RANK": "1"})
    start = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=120)
    finally:
        survivor.kill()
        dying.kill()
    assert dying.wait(30) == 3
    assert survivor.returncode == 1, err
    assert "dissect capture: error: rank 0 of 2" in err and "another rank died" in err
    assert time.monotonic() - start < 120
    assert not (tmp_path / "a.h5").exists()


def test_context_rejects_bad_arguments():
    with pytest.raises(Exception, match="distributed must be"):
        resolve("yes")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, backend="gloo")
    assert resolve(ctx) is None  # a world of one is a single process
