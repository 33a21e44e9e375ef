"""Benchmark ``dissect.probes.probe`` against scikit-learn's LogisticRegression, layer by layer.

What it measures
----------------
The real ImageNet MobileNetV2 (``load_model("mobilenet_v2-imagenet")``): all 19 blocks
``features.0`` .. ``features.18`` captured mean-pooled (float32) over ``SyntheticConcepts``
(2,000 images at 112 px by default, the model's normalization without resizing), labelled with
the dataset's ``targets`` (the main shape: 6 classes). The store is captured once and cached
(``--store``, default in the system's temporary folder); capture time is not part of the
comparison.

1. **Same work, fixed reg.** ``probe(store, targets, reg=R, control=False)`` (all 19 layers in
   one batched L-BFGS run) against, per layer, reading the layer from the store (float32),
   ``StandardScaler`` fitted on the training rows and ``LogisticRegression(C=1 / (R * n_train),
   tol=1e-4, max_iter=10000)`` (multinomial, lbfgs), on the same stratified split (ours,
   ``result.train_index`` / ``test_index``). ``R = 1 / n_train`` by default, i.e. scikit-learn's
   default ``C = 1``. Both stop at ``max |gradient| <= 1e-4``. Ratio = sklearn / ours time.
2. **Same work, the whole probe.** ``probe(store, targets)`` with its defaults (``reg="auto"``
   over a 9-value grid chosen on a validation share, refit, and the permuted-label control)
   against scikit-learn doing the same fits layer by layer (9 grid fits on the fit rows,
   validation log-loss, refit on all training rows with the chosen ``C``, the control fit).
   Ours stops the grid fits, which only rank candidates, at ``grid_tol=1e-3`` (the final fits at
   1e-4); sklearn runs every fit at 1e-4. Accuracy differences compare each sklearn probe with
   ours at the same (our chosen) ``reg``; the line above them counts the layers where sklearn's
   own validation picks the same ``reg``.

**Where scikit-learn runs.** In a fresh process that never imports torch
(``_sklearn_probes.py``), given torch's thread count as OpenMP threads and, by default, one BLAS
thread: on this project's 2-core machine OpenBLAS at 2 threads made every fit about 5x slower on
these small problems (0.72 s at 1 BLAS thread vs 3.74 s at 2 for comparison 1, OpenMP
threads making no difference), so one BLAS thread is scikit-learn's fastest setting here
(``--sklearn-blas-threads 0`` gives it torch's count; ``--sklearn-here`` runs it in this
process, as before). Its time is measured inside the worker: process start, imports and a
warm-up fit are excluded.

Both run alternately (the order flips every repeat) after an untimed warm-up; medians are
reported with minima and the load average. Accuracy difference = max over layers of
``|ours - sklearn|`` test accuracy in points (target <= 1); time target: ratio >= 5.

Timings are printed, never asserted: the script exits 0 unless something crashes.

How to run
----------
::

    .venv/bin/python benchmarks/bench_probes.py              # full run (several minutes on 2 CPUs)
    .venv/bin/python benchmarks/bench_probes.py --quick      # smoke check (500 images, 1 repeat)
    .venv/bin/python benchmarks/bench_probes.py --store /data/mnv2-probes.h5 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import NOISE_NOTE, load_text  # noqa: E402
from _common import machine_text as common_machine_text
from _sklearn_probes import sk_fit, sklearn_fixed, sklearn_full  # noqa: E402

from dissect.datasets import SyntheticConcepts  # noqa: E402
from dissect.hooks import capture  # noqa: E402
from dissect.models import Preprocess, load_model  # noqa: E402
from dissect.probes import ProbeOptions, probe  # noqa: E402
from dissect.store import ActivationStore  # noqa: E402

TIME_TARGET = 5.0
ACC_TARGET = 1.0  # points
LAYERS = [f"features.{i}" for i in range(19)]


def machine_text(device: torch.device) -> str:
    import sklearn

    return common_machine_text(
        device, f"scikit-learn {sklearn.__version__}, numpy {np.__version__}")


def get_store(args: argparse.Namespace) -> tuple[ActivationStore, np.ndarray]:
    """Capture (or reuse) the MobileNetV2 store; return it with the dataset targets."""
    model, transform = load_model("mobilenet_v2-imagenet")
    if isinstance(transform, Preprocess):
        transform = transform.without_resize()
    data = SyntheticConcepts(args.images, size=args.size, seed=0, transform=transform)
    path = Path(args.store) if args.store else (
        Path(tempfile.gettempdir()) / "dissect-bench-probes"
        / f"mnv2-synthetic{args.images}-{args.size}px.h5")
    t0 = time.perf_counter()
    store = capture(model, data, LAYERS, path, pool="mean", dtype="float32",
                    batch_size=64, device=args.device, progress=False)
    print(f"store: {path} ({time.perf_counter() - t0:.1f} s to capture or open), "
          f"{len(store)} rows, widths {[store[n].shape[1] for n in LAYERS]}", flush=True)
    return store, data.targets.numpy()


# --------------------------------------------------------------------------- sklearn side


class Measured(NamedTuple):
    """A result with the seconds its producer measured itself (a worker process)."""

    seconds: float
    value: Any


def sklearn_runner(store: ActivationStore, args: argparse.Namespace):
    """``run(job) -> result``: scikit-learn in a fresh torch-free process (default), or here.

    The worker (``_sklearn_probes.py``) gets ``torch.get_num_threads()`` OpenMP threads and
    ``--sklearn-blas-threads`` BLAS threads (default 1: its fastest setting here, see the module
    doc), and reports the time of the job alone (process start, imports and a warm-up fit
    excluded).
    """
    threads = str(torch.get_num_threads())
    if args.sklearn_here:
        def read(layer: str) -> np.ndarray:
            return store[layer][:]

        def here(job: dict) -> Any:
            y = np.asarray(job["y"])
            ix = {k: np.asarray(job[k]) for k in ("train", "test", "val") if k in job}
            if job["kind"] == "fixed":
                return sklearn_fixed(read, LAYERS, y, ix["train"], ix["test"], job["reg"])
            return sklearn_full(read, LAYERS, y, ix["train"], ix["test"], ix["val"],
                                job["seed"], job["regs"], job["grid"])
        return here

    worker = Path(__file__).resolve().parent / "_sklearn_probes.py"
    blas = str(args.sklearn_blas_threads or threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=blas,
               MKL_NUM_THREADS=blas)

    def in_process(job: dict) -> Measured:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump({**job, "store": str(store.path), "layers": LAYERS}, fh)
        try:
            proc = subprocess.run([sys.executable, str(worker), fh.name], env=env,
                                  capture_output=True, text=True)
        finally:
            os.unlink(fh.name)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT "):])
                if res["torch_loaded"]:
                    raise RuntimeError("the scikit-learn worker imported torch")
                return Measured(res["seconds"], {k: tuple(v) for k, v in res["out"].items()})
        raise RuntimeError(f"scikit-learn worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return in_process


# --------------------------------------------------------------------------- comparison


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(name: str, ours_fn, theirs_fn, repeats: int, warm: bool = True) -> dict:
    if warm:
        ours_fn()  # warm-up (first kernels); sklearn was warmed up in main()
    times: dict[str, list[float]] = {"dissect": [], "sklearn": []}
    outs: dict[str, object] = {}
    for r in range(repeats):
        order = ("dissect", "sklearn") if r % 2 == 0 else ("sklearn", "dissect")
        for impl in order:
            t, out = timed(ours_fn if impl == "dissect" else theirs_fn)
            if isinstance(out, Measured):
                t, out = out.seconds, out.value
            times[impl].append(t)
            outs[impl] = out
            print(f"    repeat {r + 1}/{repeats} {name:<10} {impl:<8} {t:7.2f} s  "
                  f"({load_text()})", flush=True)
    return {"times": times, "outs": outs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke check: 500 images, 1 repeat")
    p.add_argument("--images", type=int, default=2000, help="synthetic images (2000)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (112)")
    p.add_argument("--store", default=None, help="cached store path (default: temp folder)")
    p.add_argument("--reg", type=float, default=None,
                   help="fixed reg of comparison 1 (default 1 / n_train: sklearn's C=1)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed repeats (3)")
    p.add_argument("--skip-full", action="store_true", help="only comparison 1")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--sklearn-blas-threads", type=int, default=1,
                   help="BLAS threads of the scikit-learn process (1; 0: as many as torch's)")
    p.add_argument("--sklearn-here", action="store_true",
                   help="run scikit-learn in this process (beside torch's thread pool)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both torch and sklearn's BLAS (default: libraries' own)")
    args = p.parse_args(argv)
    if args.quick:
        args.images = 500 if args.images == p.get_default("images") else args.images
        args.repeats = 1 if args.repeats == p.get_default("repeats") else args.repeats
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("scikit-learn is not installed: pip install -e '.[bench]'; nothing to do")
        return 0
    device = torch.device(args.device)
    print(machine_text(device), flush=True)
    print(NOISE_NOTE, flush=True)
    store, y = get_store(args)
    opts = ProbeOptions()
    blas = None
    if args.sklearn_here:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        blas = threadpool_limits(torch.get_num_threads())  # sklearn's BLAS threads
        sk_fit(np.random.default_rng(0).normal(size=(50, 4)), np.arange(50) % 3, 1.0)
        print("scikit-learn runs in this process, beside torch's thread pool", flush=True)
    else:
        print(f"scikit-learn runs in a fresh process without torch: "
              f"{torch.get_num_threads()} OpenMP thread(s), "
              f"{args.sklearn_blas_threads or torch.get_num_threads()} BLAS thread(s)",
              flush=True)
    sklearn = sklearn_runner(store, args)
    y_list = [int(v) for v in y]

    # comparison 1: fixed reg, no control (identical work on both sides)
    base = probe(store, y, reg=1.0, control=False, progress=False, device=device)
    train, test = base.train_index, base.test_index
    reg = args.reg if args.reg is not None else 1.0 / len(train)
    print(f"\n1. fixed reg = {reg:.3g} (sklearn C = {1 / (reg * len(train)):.3g}), 19 layers, "
          f"{len(train)} train / {len(test)} test rows, control off", flush=True)
    res1 = compare(
        "fixed-reg",
        lambda: probe(store, y, reg=reg, control=False, progress=False, device=device),
        lambda: sklearn({"kind": "fixed", "y": y_list, "train": train.tolist(),
                         "test": test.tolist(), "reg": reg}),
        args.repeats)
    ours, theirs = res1["outs"]["dissect"], res1["outs"]["sklearn"]
    diffs = [(abs(ours[n].test_accuracy - theirs[n][1]) * 100,
              abs(ours[n].train_accuracy - theirs[n][0]) * 100, n) for n in LAYERS]
    print(f"  {'layer':<12} {'ours test':>9} {'sk test':>8} {'ours train':>10} {'sk train':>9} "
          f"{'iters':>6}")
    for n in LAYERS:
        print(f"  {n:<12} {100 * ours[n].test_accuracy:9.2f} {100 * theirs[n][1]:8.2f} "
              f"{100 * ours[n].train_accuracy:10.2f} {100 * theirs[n][0]:9.2f} "
              f"{ours[n].iterations:6d}")
    report("fixed reg, no control", res1["times"], max(d[0] for d in diffs),
           max(d[1] for d in diffs))

    if not args.skip_full:
        grid = list(opts.reg_grid)
        print(f"\n2. whole probe: reg='auto' over {len(grid)} values + refit + control "
              "(sklearn: the same fits, layer by layer)", flush=True)
        res2 = compare_full(store, y, device, grid, args.repeats, sklearn)
        ours, theirs = res2["outs"]["dissect"], res2["outs"]["sklearn"]
        same_reg = sum(ours[n].reg == theirs[n][0] for n in LAYERS)
        print(f"  validation picks the same reg as ours on {same_reg}/{len(LAYERS)} layers")
        acc = max(abs(ours[n].test_accuracy - theirs[n][1]) * 100 for n in LAYERS)
        ctrl = max(abs(ours[n].control_test_accuracy - theirs[n][2]) * 100 for n in LAYERS)
        report("reg=auto + control (whole probe)", res2["times"], acc, None, ctrl)
    store.close()
    if blas is not None:
        blas.unregister()
    return 0


def compare_full(store, y, device, grid, repeats, sklearn):
    holder = {}

    def ours():
        holder["r"] = probe(store, y, progress=False, device=device)
        return holder["r"]

    def theirs():
        r = holder["r"]
        return sklearn({"kind": "full", "y": [int(v) for v in y],
                        "train": r.train_index.tolist(), "test": r.test_index.tolist(),
                        "val": r.val_index.tolist(), "seed": int(r.settings["seed"]),
                        "regs": {n: r[n].reg for n in LAYERS}, "grid": list(grid)})

    ours()  # warm-up, and the split / chosen regs sklearn reuses
    return compare("auto+ctrl", ours, theirs, repeats, warm=False)


def report(label, times, acc_diff, train_diff=None, ctrl_diff=None):
    ours, theirs = times["dissect"], times["sklearn"]
    med = statistics.median(theirs) / statistics.median(ours)
    low = min(theirs) / min(ours)
    print(f"  {label}: dissect {statistics.median(ours):.2f} s (min {min(ours):.2f}), sklearn "
          f"{statistics.median(theirs):.2f} s (min {min(theirs):.2f})")
    print(f"  time ratio sklearn / dissect (median) = {med:.2f}x [min/min {low:.2f}x] "
          f"(target >= {TIME_TARGET:.0f}x)")
    extra = f", train {train_diff:.2f}" if train_diff is not None else ""
    extra += f", control test {ctrl_diff:.2f}" if ctrl_diff is not None else ""
    print(f"  largest |test accuracy difference| = {acc_diff:.2f} points{extra} "
          f"(target <= {ACC_TARGET:.0f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
