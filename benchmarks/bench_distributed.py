"""Benchmark multi-process runs: 1 vs 2 CPU processes on the same capture + Network Dissection.

What it measures
----------------
The same work, a ``capture`` (float16) of ResNet-18 (seeded random weights) at ``layer2,
layer3,layer4`` over ``SyntheticConcepts`` images followed by ``netdissect.dissect`` of those
layers, is run

- in one process with one torch thread (the baseline a 2-way split should halve),
- in one process with two torch threads (what one process makes of the same two cores),
- under ``torchrun --nproc_per_node=2`` with one torch thread per process (gloo, CPU).

Each run is a fresh process (``torchrun`` for the 2-process one); the order rotates every
repeat and medians are printed. Times are measured inside the processes (rank 0; the ranks
finish together because every run ends with a collective): ``capture`` (shards + publish),
``dissect`` (thresholds + counting + reductions) and their sum; the launch column is the wall
time of the whole command (interpreter, imports, torchrun's rendezvous) for reference.

The merge overhead is read from :attr:`dissect.distributed.DistContext.timings` on rank 0:
``publish`` (rank 0 writing the virtual store over the shards, plus the barrier around it),
``wait for the shards`` (rank 0 waiting at the barrier after its own shard: load imbalance),
``threshold merge`` and ``count reduction`` (time inside the all-reduces, including waiting for
the slower rank). The thresholds and IoU of every run are hashed: the 2-process results must be
identical to the 1-process ones, and the script says whether they are.

Timings are printed, never asserted. On a shared 2-core machine other processes compete for the
cores (the load average is printed before and after); read the medians, not single runs.

How to run
----------
::

    .venv/bin/python benchmarks/bench_distributed.py            # 3 repeats, N=192, 112 px
    .venv/bin/python benchmarks/bench_distributed.py --quick    # smoke check, 1 repeat, N=48
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import load_text  # noqa: E402

LAYERS = ("layer2", "layer3", "layer4")
MODES = ("1 proc x 1 thread", "1 proc x 2 threads", "2 procs x 1 thread")


def digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- one run (worker)


def worker(args: argparse.Namespace) -> None:
    """One process of a run (alone, or a rank under torchrun); rank 0 writes a JSON report."""
    torch.set_num_threads(args.threads)
    import torchvision

    from dissect import distributed
    from dissect.datasets import SyntheticConcepts
    from dissect.hooks import capture
    from dissect.netdissect import dissect

    ctx = distributed.setup(device="cpu")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    data = SyntheticConcepts(args.images, size=args.size, seed=0)
    flag = ctx if ctx is not None else False
    out = Path(args.worker)
    t0 = time.perf_counter()
    store = capture(model, data, list(LAYERS), out / "acts.h5", batch_size=args.batch_size,
                    device="cpu", progress=False, distributed=flag)
    t1 = time.perf_counter()
    result = dissect(store, data, list(LAYERS), batch_size=args.batch_size, device="cpu",
                     progress=False, distributed=flag)
    t2 = time.perf_counter()
    store.close()
    timings = ctx.gather("report", dict(ctx.timings)) if ctx is not None else [{}]
    if ctx is None or ctx.is_main:
        report = {
            "world": 1 if ctx is None else ctx.world_size,
            "threads": torch.get_num_threads(),
            "capture_s": t1 - t0,
            "dissect_s": t2 - t1,
            "timings": timings,
            "thresholds": digest({k: result.thresholds(k) for k in LAYERS}),
            "iou": digest({k: result.iou(k) for k in LAYERS}),
        }
        (out / "report.json").write_text(json.dumps(report))
    if ctx is not None:
        ctx.close()


# --------------------------------------------------------------------------- driver


def launch(mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    here = str(Path(__file__).resolve())
    common = ["--worker", str(tmp), "--images", str(args.images), "--size", str(args.size),
              "--batch-size", str(args.batch_size)]
    if mode.startswith("2 procs"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", here, *common, "--threads", "1"]
    else:
        cmd = [sys.executable, here, *common, "--threads", "2" if "2 threads" in mode else "1"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    report = json.loads((tmp / "report.json").read_text())
    report["launch_s"] = wall
    return report


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke check: N=48, 1 repeat")
    p.add_argument("--images", type=int, default=192, help="number of images (default 192)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="rotating repeats (default 3)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    if args.quick:
        args.images, args.repeats = 48, 1

    import h5py

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"machine: {platform.platform()}, os.cpu_count()={os.cpu_count()}, usable CPUs={cpus}"
          f"\npython {platform.python_version()}, torch {torch.__version__}, "
          f"h5py {h5py.__version__}\nbefore: {load_text()}", flush=True)
    print(f"work: capture (float16) + netdissect of resnet18 {','.join(LAYERS)}, "
          f"N={args.images} SyntheticConcepts images {args.size} px, batch {args.batch_size}; "
          f"{args.repeats} repeats, order rotated", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
        for mode in order:
            with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
                rep = launch(mode, args, Path(tmp))
            runs[mode].append(rep)
            print(f"  repeat {r + 1}/{args.repeats} {mode:<20} capture {rep['capture_s']:6.2f} s"
                  f"  dissect {rep['dissect_s']:6.2f} s  launch {rep['launch_s']:6.2f} s",
                  flush=True)
    print(f"after: {load_text()}")

    print(f"\nmedians of {args.repeats} (seconds)")
    head = f"{'mode':<20} {'capture':>8} {'dissect':>8} {'total':>8} {'launch':>8}"
    print(head + "\n" + "-" * len(head))
    total: dict[str, float] = {}
    for mode in MODES:
        c = med([x["capture_s"] for x in runs[mode]])
        d = med([x["dissect_s"] for x in runs[mode]])
        total[mode] = med([x["capture_s"] + x["dissect_s"] for x in runs[mode]])
        lw = med([x["launch_s"] for x in runs[mode]])
        print(f"{mode:<20} {c:>8.2f} {d:>8.2f} {total[mode]:>8.2f} {lw:>8.2f}")
    base, two_threads, dist = (runs[m] for m in MODES)
    for name, key in (("capture", "capture_s"), ("dissect", "dissect_s")):
        s = med([x[key] for x in base]) / med([x[key] for x in dist])
        print(f"speedup of 2 processes over 1 process x 1 thread, {name}: {s:.2f}x")
    print(f"speedup of 2 processes over 1 process x 1 thread, total: "
          f"{total[MODES[0]] / total[MODES[2]]:.2f}x")
    print(f"speedup of 2 processes over 1 process x 2 threads, total: "
          f"{total[MODES[1]] / total[MODES[2]]:.2f}x")

    print("\nmerge overhead in the 2-process runs (rank 0, medians; seconds and share of total)")
    phases = ("publish", "wait for the shards", "threshold merge", "count reduction")
    dist_total = total[MODES[2]]
    for phase in phases:
        value = med([x["timings"][0].get(phase, 0.0) for x in dist])
        other = med([x["timings"][1].get(phase, 0.0) for x in dist])
        print(f"  {phase:<20} {value:8.4f} s  ({100 * value / dist_total:5.2f} %)"
              f"   rank 1: {other:8.4f} s")
    merge = med([sum(x["timings"][0].get(ph, 0.0) for ph in phases if ph != "wait for the shards")
                 for x in dist])
    print(f"  publish + reductions {merge:8.4f} s  ({100 * merge / dist_total:5.2f} % of the "
          "2-process total)")

    hashes = {(x["thresholds"], x["iou"]) for m in MODES for x in runs[m]}
    print(f"\nthresholds and IoU identical in every run (1 and 2 processes): "
          f"{'yes' if len(hashes) == 1 else 'NO: ' + str(sorted(hashes))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
