"""Benchmark how ``dissect()`` scales with the number of rows, up to Broden's size.

What it measures
----------------
Store: one layer of 512 units of 7x7, float16 (what ``capture(..., dtype="float16")`` writes
for a ResNet-18 ``layer4``), written here directly through ``create_store`` and
``StoreWriter`` (valid ``/index`` = rows 0..N-1, ``/maxima`` = each row's per-unit spatial
max). Values: ``relu(scale_k * (0.6 z_img + 0.8 z_pix - offset_k))``, ``z`` standard normal
(one draw per image and unit, one per pixel), so a unit fires on some images, on a few
pixels each. 8 units are dead (always 0) and 24 fire on about 0.1% of their pixels (threshold
``T = 0``); the other units' offsets spread their active share from about 50% down to 1%.
Rows are drawn in blocks of 512 from ``numpy.random.default_rng([0, block])``, so the store
of N rows is the first N rows of the largest one. Annotations: ``SyntheticConcepts(63305,
size=224)`` (Broden's 63,305 images; 112x112 label planes; 31 concepts), the store's row
``i`` being item ``i``.

For each N (full: 8,000, 16,000, 32,000 and 63,305 rows; ``--quick``: 1,000, 2,000, 4,000,
8,000) the store is written into a temporary folder, one fresh subprocess of this script
(``--child``) runs ``dissect(store, dataset, ["layer"], progress=False)`` once with an empty
annotation cache (``DISSECT_CACHE_DIR`` set to a folder of its own: *cold*, the cache is
built where ``dissect()`` has one) and once more in the same process (*warm*, the cache
reused; ``--no-warm`` skips it), then the store and cache are deleted. Before the timings one
``IoUTally.add`` on one row loads numba's kernels (not timed, and in the memory baseline).
Peak memory: Linux ``VmHWM`` of the child, reset through ``/proc/self/clear_refs`` right
before each call (when the kernel refuses the reset, the child's ``ru_maxrss``, which covers
its whole life, is used instead); the table shows the peak and ``+``, how far it rose above
the RSS the step began with (the child starts at about 0.7 GB: torch, numba, h5py). To say
where memory grows with N, the child then runs two of ``dissect()``'s steps again by hand,
each with its own peak: the thresholds (``_dissect_store``'s ``_thresholds``:
``exact_quantiles`` over the store) and the top-images step (``stats.top_rows`` over
``store.maxima`` read in chunks, as ``_dissect_store`` does it); their results must equal
``dissect()``'s. An N that takes longer than ``--timeout`` seconds (default 1200; 300 with
``--quick``) is killed and it and the larger Ns are left out of the report.

There is no outside peer: each figure is compared with ours at the smallest N of the same
run. Targets (printed, never asserted): time linear in N, i.e. ``time(largest) /
time(smallest)`` within 9x for 7.9x the rows (``--quick``: 8x the rows, same 9x bound), for
the wall time and for the child's CPU time (``time.process_time``: on a shared machine the
wall time also counts the waits for a CPU), and peak RSS flat, its spread ``(max - min) /
min`` over the Ns within 10%.

The store files are read right after being written, so from the page cache (the machine has
the RAM); read ``s per 1k rows``, not absolute seconds, on a shared machine. One torch thread
by default (``--threads``): ``IoUTally``'s numba engine splits images between
``torch.get_num_threads()`` threads.

How to run
----------
::

    .venv/bin/python benchmarks/bench_netdissect_scale.py --quick   # N up to 8k, ~1 min
    .venv/bin/python benchmarks/bench_netdissect_scale.py           # N up to 63,305: 3.2 GB
                                                                    # of disk, ~10-15 min
    .venv/bin/python benchmarks/bench_netdissect_scale.py --sizes 500 1000 --no-warm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import maxrss_mib, reset_peak, status_mib  # noqa: E402

from dissect.datasets import SyntheticConcepts, collate  # noqa: E402
from dissect.netdissect import IoUTally, dissect  # noqa: E402
from dissect.stats import exact_quantiles  # noqa: E402
from dissect.store import ActivationStore, StoreWriter, create_store  # noqa: E402

BRODEN_SIZE = 63_305
FULL = (8_000, 16_000, 32_000, BRODEN_SIZE)
QUICK = (1_000, 2_000, 4_000, 8_000)
UNITS, H, W = 512, 7, 7
LAYER = "layer"
QUANTILE = 0.005
BLOCK = 512
SEED = 0
DEAD, RARE = 8, 24
TIME_TARGET = 9.0
RSS_TARGET = 0.10


# --------------------------------------------------------------------------- memory


def step(out: dict[str, Any], name: str, fn: Any) -> Any:
    """Run ``fn``; note in ``out`` its seconds (``name_s``), the RSS before it
    (``name_before``) and the peak RSS while it ran (``name_peak``, None when ``VmHWM``
    cannot be reset); return its value."""
    out[f"{name}_before"] = status_mib("VmRSS")
    can_reset = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    out[f"{name}_s"] = time.perf_counter() - t0
    out[f"{name}_cpu"] = time.process_time() - c0
    out[f"{name}_peak"] = status_mib("VmHWM") if can_reset else None
    return value


def folder_mib(folder: Path) -> float:
    if not folder.is_dir():
        return 0.0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


# --------------------------------------------------------------------------- the store


def unit_profile() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit: offset, scale, dead flag (the same for every N)."""
    rng = np.random.default_rng([SEED, 1 << 30])
    offset = rng.uniform(0.0, 2.3, UNITS).astype(np.float32)
    scale = rng.lognormal(0.0, 0.5, UNITS).astype(np.float32)
    order = rng.permutation(UNITS)
    dead = np.zeros(UNITS, dtype=bool)
    dead[order[:DEAD]] = True
    offset[order[DEAD : DEAD + RARE]] = 3.0  # P(z > 3) = 0.13% of pixels: T = 0
    return offset, scale, dead


def block_rows(b: int, rows: int, profile: tuple[np.ndarray, np.ndarray, np.ndarray]
               ) -> np.ndarray:
    """Rows ``b * BLOCK : b * BLOCK + rows`` of the largest store, ``(rows, 512, 7, 7)``
    float16."""
    offset, scale, dead = profile
    rng = np.random.default_rng([SEED, b])
    x = rng.standard_normal((rows, UNITS, H, W), dtype=np.float32)
    x *= 0.8
    x += 0.6 * rng.standard_normal((rows, UNITS, 1, 1), dtype=np.float32)
    x -= offset[None, :, None, None]
    np.maximum(x, 0, out=x)
    x *= scale[None, :, None, None]
    x[:, dead] = 0
    return x.astype(np.float16)


def write_store(path: Path, n: int) -> float:
    """Write the store of the first ``n`` rows; return the seconds it took."""
    t0 = time.perf_counter()
    create_store(path, n=n, layers={LAYER: (UNITS, H, W)}, dtype="float16", pool=None,
                 attrs={"model": "bench_netdissect_scale: synthetic relu activations"})
    profile = unit_profile()
    with StoreWriter(path) as writer:
        for b, start in enumerate(range(0, n, BLOCK)):
            rows = min(BLOCK, n - start)
            acts = block_rows(b, rows, profile)
            maxima = acts.max(axis=(2, 3)).astype(np.float32)
            writer.write(start, np.arange(start, start + rows, dtype=np.int64), {LAYER: acts},
                         {LAYER: maxima})
        writer.finish()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- the child


def by_hand_thresholds(store: ActivationStore) -> np.ndarray:
    """The threshold step of ``_dissect_store``: its ``_thresholds`` (``exact_quantiles`` over
    the store's blocks) when it has one, else ``exact_quantiles`` over blocks read here."""
    from dissect.netdissect import run as netdissect_run

    if hasattr(netdissect_run, "_thresholds"):
        found = netdissect_run._thresholds(store, [LAYER], range(len(store)), QUANTILE,
                                           torch.device("cpu"), None)
        return found[0][LAYER]
    ds = store[LAYER]
    n, units, h, w = ds.shape
    read = min(len(store), max(1, (1 << 24) // max(1, units * h * w)))

    def batches() -> Any:
        for start in range(0, n, read):
            block = torch.from_numpy(ds[start : min(start + read, n)]).float()
            yield block.transpose(0, 1).reshape(units, -1)

    return exact_quantiles(batches, units, n * h * w, 1 - QUANTILE, dtype=np.dtype(ds.dtype))


def by_hand_top(store: ActivationStore, k: int = 16) -> np.ndarray:
    """The top-images step of ``_dissect_store``: ``stats.top_rows`` streaming the maxima in
    chunks (older releases: the maxima read whole, ``argsort`` per unit)."""
    from dissect import stats

    index = store.index
    if hasattr(stats, "top_rows"):
        order = stats.top_rows(lambda a, b: store.maxima(LAYER, a, b), len(index), UNITS, k)
    else:
        maxima = store.maxima(LAYER)
        maxima = np.where(np.isfinite(maxima), maxima, -np.inf)
        order = np.argsort(-maxima, axis=0, kind="stable")[: min(k, len(maxima))].T
    return index[order]


def child(store_path: Path, warm: bool) -> dict[str, Any]:
    """One N in this fresh process: dissect() cold (and warm), then two steps by hand."""
    store = ActivationStore(store_path)
    dataset = SyntheticConcepts(BRODEN_SIZE, size=224)
    cache = Path(os.environ["DISSECT_CACHE_DIR"])
    # numba's kernels load (or compile) on the first add(): not timed, part of the baseline
    tally = IoUTally(UNITS, [c for c in dataset.concepts if c.number != 0],
                     list(dataset.categories))
    item = collate([dataset[0]])
    t0 = time.perf_counter()
    tally.add(torch.from_numpy(store[LAYER][:1]).float(), torch.zeros(UNITS),
              item["pixel_labels"], item["image_labels"], item["annotated"])
    kernels_s = time.perf_counter() - t0
    del tally, item
    out: dict[str, Any] = {"n": len(store), "baseline": status_mib("VmRSS"),
                           "threads": torch.get_num_threads(), "kernels_s": kernels_s}

    def run() -> Any:
        return dissect(store, dataset, [LAYER], quantile=QUANTILE, progress=False)

    result = step(out, "cold", run)
    out["cache_mib"] = folder_mib(cache)
    thr = result.thresholds(LAYER)
    out["t0"] = int(np.sum(thr == 0))
    top_images = result.top_images(LAYER)
    out["detectors"] = int(np.sum(result.iou(LAYER).max(axis=1) > result.iou_threshold))
    if warm:
        again = step(out, "warm", run)
        out["warm_same"] = bool(np.array_equal(again.iou(LAYER), result.iou(LAYER)))
    del result
    by_hand = step(out, "thr", lambda: by_hand_thresholds(store))
    out["thr_same"] = bool(np.array_equal(by_hand, thr))
    top = step(out, "top", lambda: by_hand_top(store))
    out["top_same"] = bool(np.array_equal(top, top_images))
    out["maxrss"] = maxrss_mib()
    return out


def run_child(store_path: Path, cache: Path, threads: int, warm: bool, timeout: float
              ) -> dict[str, Any] | None:
    """The child's result, or None when it ran past ``timeout`` seconds (then killed)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(store_path),
           "--threads", str(threads)] + ([] if warm else ["--no-warm"])
    env = dict(os.environ, DISSECT_CACHE_DIR=str(cache))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child for {store_path} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


# --------------------------------------------------------------------------- report


def load() -> str:
    if not hasattr(os, "getloadavg"):
        return "load average n/a"
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def mib(value: float | None, width: int = 8) -> str:
    return f"{value:>{width}.0f}" if value is not None else f"{'n/a':>{width}}"


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / min(values)


def growth(r: dict[str, Any], name: str) -> float | None:
    """How far RSS rose above what it was when step ``name`` began (MiB)."""
    peak, before = r.get(f"{name}_peak"), r.get(f"{name}_before")
    return peak - before if peak is not None and before is not None else None


def report(rows: list[dict[str, Any]], warm: bool) -> None:
    first, last = rows[0], rows[-1]
    runs = (("cold", "cold"),) + ((("warm", "warm"),) if warm else ())
    print()
    print("dissect() of one 512-unit 7x7 float16 layer against SyntheticConcepts(63305, 224), "
          "one fresh process per N")
    print("time (seconds; wall = elapsed, CPU = the child's process time, steadier when other "
          "processes compete for the CPUs)")
    head = f"{'rows':>6} {'write':>6}"
    for label, _ in runs:
        head += f" {label + ' wall':>9} {'s/1k':>6} {'x 1st':>6} {label + ' CPU':>9} {'x 1st':>6}"
    print(head + f" {'kernels':>7} {'load':>5}")
    for r in rows:
        k = r["n"] / 1000
        line = f"{r['n']:>6} {r['write_s']:>6.1f}"
        for _, key in runs:
            line += (f" {r[key + '_s']:>9.2f} {r[key + '_s'] / k:>6.3f} "
                     f"{r[key + '_s'] / first[key + '_s']:>5.2f}x {r[key + '_cpu']:>9.2f} "
                     f"{r[key + '_cpu'] / first[key + '_cpu']:>5.2f}x")
        print(line + f" {r['kernels_s']:>7.2f} {r['load']:>5.2f}")
    print("   write = making the store (not part of dissect()); x 1st = against the first N; "
          "kernels = the untimed first IoUTally.add (> 1 s: numba compiled its kernels in this "
          "child); load = 1-minute load average after this N")
    print()
    print("memory (MiB)")
    head = f"{'rows':>6} {'base RSS':>8}"
    for label, _ in runs:
        head += f" {label + ' peak':>9} {'+':>5}"
    print(head + f" {'thr +':>6} {'top +':>6} {'cache':>6} {'T=0':>4}")
    for r in rows:
        line = f"{r['n']:>6} {mib(r['baseline'])}"
        for _, key in runs:
            line += f" {mib(r[key + '_peak'], 9)} {mib(growth(r, key), 5)}"
        print(line + f" {mib(growth(r, 'thr'), 6)} {mib(growth(r, 'top'), 6)} "
              f"{r['cache_mib']:>6.0f} {r['t0']:>4}")
    print("   base RSS = the child before its first dissect() (torch, numba, h5py loaded); "
          "peak = VmHWM during the call (reset right before it); + = peak - RSS when the step "
          "began; thr + / top + = the same for the threshold step / the top-images step run "
          "again by hand afterwards; cache = annotation cache written (on disk); T=0 = units "
          "whose threshold is 0")
    rows_ratio = last["n"] / first["n"]
    print()
    print(f"targets ({last['n']} rows = {rows_ratio:.1f}x the {first['n']}):")
    for label, key in runs:
        for what, suffix in (("wall", "_s"), ("CPU", "_cpu")):
            ratio = last[key + suffix] / first[key + suffix]
            verdict = "PASS" if ratio <= TIME_TARGET else "ABOVE"
            print(f"  time {label}, {what}: {ratio:.2f}x for {rows_ratio:.1f}x the rows (target "
                  f"within {TIME_TARGET:.0f}x, i.e. linear): {verdict}")
    for label, key in runs:
        peaks = [r[key + "_peak"] for r in rows]
        if any(p is None for p in peaks):
            peaks = [r["maxrss"] for r in rows]
            label += " (ru_maxrss: no VmHWM reset here)"
        s = spread(peaks)
        verdict = "PASS" if s <= RSS_TARGET else "ABOVE"
        print(f"  peak RSS {label}: {min(peaks):.0f} to {max(peaks):.0f} MiB, spread "
              f"{100 * s:.1f}% (target within {100 * RSS_TARGET:.0f}%): {verdict}")
    for name, what in (("cold", "dissect() cold"), ("thr", "threshold step"),
                       ("top", "top-images step")):
        g = [growth(r, name) for r in rows]
        if all(v is not None for v in g):
            print(f"  RSS growth of the {what}: {g[0]:.0f} MiB at {first['n']} rows, "
                  f"{g[-1]:.0f} MiB at {last['n']}")
    checks = [r["thr_same"] and r["top_same"] and r.get("warm_same", True) for r in rows]
    print(f"  by-hand thresholds and top images equal dissect()'s"
          f"{', warm IoU equal to cold' if warm else ''}: {'yes' if all(checks) else 'NO'}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1k, 2k, 4k, 8k (~1-2 min)")
    parser.add_argument("--sizes", type=int, nargs="+", help="the Ns (rows, ascending)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm second call")
    parser.add_argument("--tmp", type=Path, help="folder for the stores (default: TMPDIR)")
    parser.add_argument("--timeout", type=float,
                        help="seconds one N may take before it and larger Ns are given up "
                             "(default 1200, 300 with --quick)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warm = not args.no_warm
    if args.child:
        print("RESULT " + json.dumps(child(args.child, warm)))
        return 0

    sizes = sorted(args.sizes or (QUICK if args.quick else FULL))
    if sizes[-1] > BRODEN_SIZE:
        parser.error(f"at most {BRODEN_SIZE} rows (the dataset's size)")
    mode = "quick" if args.quick else "full"
    print(f"bench_netdissect_scale ({mode}; N = {', '.join(map(str, sizes))}; torch threads "
          f"{args.threads})")
    print(f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, python "
          f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}; "
          f"{load()}")
    started = time.perf_counter()
    timeout = args.timeout or (300.0 if args.quick else 1200.0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_netdissect_scale_", dir=args.tmp) as tmp:
        for n in sizes:
            path = Path(tmp) / f"rows{n}.h5"
            cache = Path(tmp) / f"cache{n}"
            write_s = write_store(path, n)
            r = run_child(path, cache, args.threads, warm, timeout)
            if r is None:
                path.unlink()
                shutil.rmtree(cache, ignore_errors=True)
                print(f"  N={n}: not finished within {timeout:.0f} s (--timeout): this N and "
                      f"the larger ones are left out; {load()}", flush=True)
                break
            r["write_s"] = write_s
            r["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            r["store_mib"] = path.stat().st_size / 2**20
            rows.append(r)
            path.unlink()
            shutil.rmtree(cache, ignore_errors=True)
            warm_text = f", warm {r['warm_s']:.1f} s" if warm else ""
            print(f"  N={n}: store {r['store_mib']:.0f} MiB written in {write_s:.1f} s; "
                  f"dissect cold {r['cold_s']:.1f} s{warm_text}; {load()}", flush=True)
    if len(rows) >= 2:
        report(rows, warm)
    else:
        print("fewer than two Ns finished: no scaling to report")
    print(f"\nwall time of this benchmark: {time.perf_counter() - started:.0f} s; {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
