"""A rank of the multi-process tests (tests/test_distributed.py): run under torchrun on CPU.

``python -m torch.distributed.run --standalone --nproc_per_node=2 _dist_worker.py run OUT``
captures and dissects a tiny CNN over synthetic concepts across the ranks, simulates a crash of
one shard and resumes it, runs the ``netdissect`` command, and writes what every rank saw to
OUT. ``_dist_worker.py die`` joins a process group and exits at once (the dying-rank test).
The model and the data are built here so the test can make the single-process reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dissect import DissectError, distributed
from dissect.cli import main as cli_main
from dissect.datasets import SyntheticConcepts
from dissect.hooks import capture
from dissect.netdissect import dissect
from dissect.stats import exact_quantiles

LAYERS = ["0", "3"]
N, SIZE = 22, 32
CAPTURE_BATCH, DISSECT_BATCH = 4, 5
QUANTILE = 0.02
CLI_ARGS = ["--dataset", "synthetic:10", "--layers", "0,3", "--batch-size", "3", "--quiet",
            "--device", "cpu"]


def build_model() -> nn.Module:
    """conv -> ReLU -> maxpool -> conv -> ReLU -> pool -> linear, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()


def build_data() -> SyntheticConcepts:
    return SyntheticConcepts(N, size=SIZE, seed=2)


class Counting(torch.utils.data.Dataset):
    """Counts the items read (to see that a resume recomputes only the missing rows)."""

    def __init__(self, data) -> None:
        self.data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.data[i]


class Broken(Counting):
    """Item 15 (in rank 1's shard) is not an image."""

    def __getitem__(self, i: int):
        return "not an image" if i == 15 else self.data[i]


def run(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = distributed.setup(timeout=60, device="cpu")  # gloo, also where GPUs exist
    assert ctx is not None and ctx.world_size == 2 and ctx.backend == "gloo"
    report: dict = {"rank": ctx.rank}
    model, data = build_model(), build_data()
    path = out / "acts.h5"

    store = capture(model, data, LAYERS, path, batch_size=CAPTURE_BATCH, dtype="float32",
                    device="cpu", progress=False, distributed=ctx)
    result = dissect(store, data, LAYERS, quantile=QUANTILE, batch_size=DISSECT_BATCH,
                     device="cpu", progress=False, distributed=ctx)
    result.to_json(out / f"result-rank{ctx.rank}.json")
    report["timings"] = dict(ctx.timings)

    # the radix path of the threshold merge (bounded memory), on gloo
    ds, rows = store["0"], ctx.shard(N, 3)
    units, positions = ds.shape[1], ds.shape[2] * ds.shape[3]

    def batches():
        for s in range(rows.start, rows.stop, 2):
            block = torch.from_numpy(ds[s : min(s + 2, rows.stop)])
            yield block.transpose(0, 1).reshape(units, -1)

    radix = exact_quantiles(batches, units, N * positions, 1 - QUANTILE, memory_values=1,
                            collective=ctx)
    np.save(out / f"radix-rank{ctx.rank}.npy", radix)

    # a standalone copy of the published store, then a crash of shard 1 and a resume
    if ctx.is_main:
        distributed.consolidate(path, out / "standalone.h5")
    store.close()
    ctx.barrier("close the store")
    if ctx.is_main:
        path.unlink()
    else:
        with h5py.File(distributed.shard_path(path, 1, 2), "r+") as f:
            f.attrs["complete"] = False
            f["progress"][()] = 4
            for layer in LAYERS:
                f["activations"][layer][4:] = 0
    ctx.barrier("simulate a crash")
    counting = Counting(data)
    resumed = capture(model, counting, LAYERS, path, batch_size=CAPTURE_BATCH, dtype="float32",
                      device="cpu", progress=False, distributed=ctx)
    report["resume_reads"] = counting.reads
    report["resumed_complete"] = resumed.complete
    resumed.close()
    again = Counting(data)  # a complete published store is reused by every rank
    capture(model, again, LAYERS, path, batch_size=CAPTURE_BATCH, dtype="float32",
            device="cpu", progress=False, distributed=ctx).close()
    report["reuse_reads"] = again.reads

    # DataLoader sources: a sequential one (each rank reads only its rows), and one with its
    # own batch sampler (each rank skips the rows before its shard)
    images = TensorDataset(torch.stack([data[i]["image"] for i in range(N)]))
    batches = [list(range(i, min(i + CAPTURE_BATCH, N))) for i in range(0, N, CAPTURE_BATCH)]
    for name, loader in (("loader.h5", DataLoader(images, batch_size=CAPTURE_BATCH)),
                         ("sampler.h5", DataLoader(images, batch_sampler=batches))):
        capture(model, loader, LAYERS, out / name, dtype="float32", device="cpu",
                progress=False, distributed=ctx).close()

    # an error on one rank is raised on every rank, naming it
    try:
        capture(model, Broken(data), LAYERS, out / "broken.h5", batch_size=CAPTURE_BATCH,
                device="cpu", progress=False, distributed=ctx)
    except DissectError as exc:
        report["broken"] = f"{type(exc).__name__}: {exc}"

    # the command line: only rank 0 prints and writes
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli_main(["netdissect", f"{Path(__file__).resolve()}:build_model", *CLI_ARGS,
                         "--out", str(out / "cli"), "--dist-timeout", "1"])
    report["cli_code"], report["cli_stdout"] = code, printed.getvalue()
    (out / f"report-rank{ctx.rank}.json").write_text(json.dumps(report))
    ctx.barrier("done")
    ctx.close()


def die() -> None:
    """Join the group, then exit without a word: the other ranks must fail, not hang."""
    ctx = distributed.setup(timeout=30, device="cpu")
    assert ctx is not None
    time.sleep(1.0)
    os._exit(3)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    else:
        die()
