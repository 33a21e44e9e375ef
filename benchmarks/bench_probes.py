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
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import NOISE_NOTE, load_text  # noqa: E402
from _common import machine_text as common_machine_text

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


def sk_layer_data(store: ActivationStore, layer: str, train: np.ndarray, test: np.ndarray):
    from sklearn.preprocessing import StandardScaler

    x = store[layer][:]  # float32, as stored (sklearn's lbfgs keeps float32: its fastest)
    scaler = StandardScaler().fit(x[train])
    return scaler.transform(x[train]), scaler.transform(x[test])


def sk_fit(x: np.ndarray, y: np.ndarray, reg: float):
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning is reported by n_iter_
        return LogisticRegression(C=1.0 / (reg * len(x)), tol=1e-4, max_iter=10000).fit(x, y)


def sklearn_fixed(store, y, train, test, reg) -> dict[str, tuple[float, float]]:
    """Per layer: (train accuracy, test accuracy) of sklearn at a fixed reg."""
    out = {}
    for layer in LAYERS:
        xtr, xte = sk_layer_data(store, layer, train, test)
        clf = sk_fit(xtr, y[train], reg)
        out[layer] = (clf.score(xtr, y[train]), clf.score(xte, y[test]))
    return out


def sklearn_full(store, y, result, grid) -> dict[str, tuple[float, float, float]]:
    """Per layer, sklearn doing probe()'s work: grid on the fit rows, refit, control.

    Returns (chosen reg, test accuracy at our chosen reg, control test accuracy).
    """
    from sklearn.metrics import log_loss

    train, test, val = result.train_index, result.test_index, result.val_index
    fit = np.setdiff1d(train, val)
    perm = np.random.default_rng([result.settings["seed"], 2]).permutation(len(y))
    y_ctrl = y[perm]
    out = {}
    for layer in LAYERS:
        xtr, xte = sk_layer_data(store, layer, train, test)
        pos = {r: i for i, r in enumerate(train)}
        fit_rows = np.array([pos[r] for r in fit])
        val_rows = np.array([pos[r] for r in val])
        losses = []
        for reg in grid:
            clf = sk_fit(xtr[fit_rows], y[fit], reg)
            losses.append(log_loss(y[val], clf.predict_proba(xtr[val_rows]),
                                   labels=np.unique(y)))
        best = len(grid) - 1 - int(np.argmin(losses[::-1]))
        reg = result[layer].reg  # compare at the same reg even where the val choice differs
        clf = sk_fit(xtr, y[train], reg)
        ctrl = sk_fit(xtr, y_ctrl[train], reg)
        out[layer] = (grid[best], clf.score(xte, y[test]), ctrl.score(xte, y_ctrl[test]))
    return out


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
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    blas = threadpool_limits(args.threads) if args.threads else None  # sklearn's BLAS threads
    sk_fit(np.random.default_rng(0).normal(size=(50, 4)), np.arange(50) % 3, 1.0)  # warm-up

    # comparison 1: fixed reg, no control (identical work on both sides)
    base = probe(store, y, reg=1.0, control=False, progress=False, device=device)
    train, test = base.train_index, base.test_index
    reg = args.reg if args.reg is not None else 1.0 / len(train)
    print(f"\n1. fixed reg = {reg:.3g} (sklearn C = {1 / (reg * len(train)):.3g}), 19 layers, "
          f"{len(train)} train / {len(test)} test rows, control off", flush=True)
    res1 = compare(
        "fixed-reg",
        lambda: probe(store, y, reg=reg, control=False, progress=False, device=device),
        lambda: sklearn_fixed(store, y, train, test, reg),
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
        res2 = compare_full(store, y, device, grid, args.repeats)
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


def compare_full(store, y, device, grid, repeats):
    holder = {}

    def ours():
        holder["r"] = probe(store, y, progress=False, device=device)
        return holder["r"]

    ours()  # warm-up, and the split / chosen regs sklearn reuses
    return compare("auto+ctrl", ours, lambda: sklearn_full(store, y, holder["r"], grid),
                   repeats, warm=False)


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
