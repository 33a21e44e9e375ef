"""Benchmark ``dissect.similarity.cka_matrix`` against ckatorch, and TwoNN against scikit-dimension.

What it measures
----------------
The real ImageNet MobileNetV2 (``load_model("mobilenet_v2-imagenet")``, torchvision's model
loaded strictly from ``mobilenet_v2-b0353104.pth``): its 19 blocks ``features.0`` ..
``features.18`` captured mean-pooled (float32; widths 32 .. 1280, 2,816 features in all) over
``SyntheticConcepts`` (2,000 images at 112 px by default, the model's normalization without
resizing). The store is captured once and cached (``--store``, default in the system's temporary
folder); capture time is not part of any comparison.

1. **The 19 x 19 CKA matrix** (linear CKA, biased and debiased). Ours: ``cka_matrix(store,
   debiased=...)``: one streamed pass over the HDF5 store (read time included) accumulating
   every cross-product in float64. The peer, **ckatorch** 1.0.3 (PyPI ``ckatorch``), as it is:

   - *as is*: ``ckatorch.cka_base(x, y, kernel="linear", unbiased=...)`` for each pair
     ``i <= j`` (190 calls, mirrored; CKA is symmetric), on the layers already in memory as
     tensors (read time excluded). Each call builds both ``N x N`` Gram matrices in float64,
     checks their symmetry (``torch.allclose``), centres them (Kornblith et al.'s
     ``center_gram_matrix``, its unbiased variant for the debiased form) and returns
     ``<Kc, Lc> / (|Kc| |Lc|)``: the exact full-data estimator, the same numbers as ours.
   - *cached*: the fastest use of its building blocks: ``center_gram_matrix(linear_kernel(x))``
     once per layer (19 ``N x N`` matrices kept in memory), then the normalized Frobenius
     products of the 190 pairs.

   ckatorch's model-level ``CKA`` class is not used: it hooks two models and computes the
   minibatch estimator of Nguyen et al. (``cka_batch``: unbiased HSIC per minibatch of
   *3-D* ``(batch, tokens, features)`` outputs, averaged over epochs), a different, batch-size
   dependent quantity that does not apply to pooled ``(N, C)`` rows.

   Results: largest ``|ours - ckatorch|`` over the 361 entries (target: equal, <= 1e-6), time
   ratio ckatorch / ours (target >= 5x).
2. **Memory against N.** Synthetic rows of the same 19 widths (ReLU of random mixtures of a
   shared 64-dimensional latent, float32) written directly to stores of N = 2k, 8k, 32k rows.
   Each measurement runs in a fresh subprocess and reports its peak resident memory (VmHWM) and
   the peak minus the resident memory after imports, opening the data and a tiny warm-up call.
   Ours: the whole biased matrix. ckatorch (as is): one ``cka_base`` call on the widest pair
   (its per-call peak is the loop's peak), on the layers in memory; its time for the 190 pairs
   is extrapolated from that call and labelled so. Its ``N x N`` float64 Gram matrices
   (``8 N^2`` bytes each, at least three alive per call) are not attempted when three would
   exceed 80% of the RAM (N = 32k: 3 x 7.6 GiB on this project's 23.5 GiB machine): the need
   is printed instead.
3. **Intrinsic dimension** (TwoNN) of the 19 layers on the captured rows: ours
   (``intrinsic_dimension(store, layer, max_rows=None)``, exact float64 neighbours) against
   ``skdim.id.TwoNN().fit(x).dimension_`` (scikit-dimension, PyPI ``scikit-dimension``) on the
   same float64 rows: largest relative difference (target: equal) and times.

Timings are printed, never asserted: the script exits 0 unless something crashes.

How to run
----------
::

    .venv/bin/python benchmarks/bench_similarity.py            # full (about 8 min on 2 CPUs)
    .venv/bin/python benchmarks/bench_similarity.py --quick    # smoke check (under 2 min)
    .venv/bin/python benchmarks/bench_similarity.py --sizes 2000 8000 --repeats 5 --threads 1
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import NOISE_NOTE, load_text  # noqa: E402
from _common import machine_text as common_machine_text  # noqa: E402

from dissect.datasets import SyntheticConcepts  # noqa: E402
from dissect.geometry import intrinsic_dimension  # noqa: E402
from dissect.hooks import capture  # noqa: E402
from dissect.models import Preprocess, load_model  # noqa: E402
from dissect.similarity import cka_matrix  # noqa: E402
from dissect.store import ActivationStore, StoreWriter, create_store  # noqa: E402

LAYERS = [f"features.{i}" for i in range(19)]
WIDTHS = [32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320, 1280]
TIME_TARGET = 5.0
EQUAL_TARGET = 1e-6
RAM_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dist_version(name: str) -> str:
    """The installed version of distribution ``name`` (``"not installed"`` if absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def vmhwm_mib() -> float:
    """This process's peak resident memory so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- data


def get_store(args: argparse.Namespace) -> ActivationStore:
    """Capture (or reuse) the MobileNetV2 store of ``args.images`` synthetic images."""
    model, transform = load_model("mobilenet_v2-imagenet")
    if isinstance(transform, Preprocess):
        transform = transform.without_resize()
    data = SyntheticConcepts(args.images, size=args.size, seed=0, transform=transform)
    path = Path(args.store) if args.store else (
        Path(tempfile.gettempdir()) / "dissect-bench-similarity"
        / f"mnv2-synthetic{args.images}-{args.size}px.h5")
    t0 = time.perf_counter()
    store = capture(model, data, LAYERS, path, pool="mean", dtype="float32", batch_size=64,
                    device=args.device, progress=False)
    print(f"store: {path} ({time.perf_counter() - t0:.1f} s to capture or open), {len(store)} "
          f"rows, widths {[store[n].shape[1] for n in LAYERS]}", flush=True)
    return store


def synthetic_store(n: int, folder: Path) -> Path:
    """A pooled store of ``n`` rows with MobileNetV2's 19 widths (written once, cached)."""
    path = folder / f"synthetic-{n}.h5"
    if path.exists():
        try:
            if ActivationStore(path).complete:
                return path
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pass
    mixes = [np.random.default_rng(100 + i).normal(size=(64, w)) / 8 for i, w in
             enumerate(WIDTHS)]
    create_store(path, n=n, layers={name: (w,) for name, w in zip(LAYERS, WIDTHS, strict=True)},
                 dtype="float32", pool="mean", attrs={"model": "synthetic"})
    rng = np.random.default_rng(n)
    with StoreWriter(path) as w:
        for start in range(0, n, 4096):
            stop = min(n, start + 4096)
            latent = rng.normal(size=(stop - start, 64))
            acts = {name: np.maximum(latent @ mix + 0.5 * rng.normal(size=(stop - start, wd)),
                                     0).astype(np.float32)
                    for name, mix, wd in zip(LAYERS, mixes, WIDTHS, strict=True)}
            w.write(start, np.arange(start, stop), acts, acts)
        w.finish()
    return path


def layers_in_memory(store: ActivationStore) -> list[torch.Tensor]:
    return [torch.from_numpy(store[name][:]) for name in LAYERS]


# --------------------------------------------------------------------------- ckatorch


def ckatorch_as_is(feats: list[torch.Tensor], debiased: bool) -> np.ndarray:
    """``ckatorch.cka_base`` for every pair ``i <= j``, mirrored."""
    from ckatorch import cka_base

    k = len(feats)
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = float(cka_base(feats[i], feats[j], kernel="linear",
                                                   unbiased=debiased))
    return out


def ckatorch_cached(feats: list[torch.Tensor], debiased: bool) -> np.ndarray:
    """ckatorch's building blocks: each centred Gram matrix once, then the pairs."""
    from ckatorch import center_gram_matrix, linear_kernel

    grams = [center_gram_matrix(linear_kernel(f.double()), debiased) for f in feats]
    norms = [float(torch.linalg.norm(g, ord="fro")) for g in grams]
    k = len(feats)
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = float(grams[i].ravel().dot(grams[j].ravel())) / (
                norms[i] * norms[j])
    return out


# --------------------------------------------------------------------------- workers


def worker(args: argparse.Namespace) -> int:
    """One memory measurement in this fresh process; prints ``RESULT {json}``."""
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = ActivationStore(args.worker_store)
    if args.worker == "ours":
        cka_matrix(store, LAYERS[:2], progress=False, device="cpu")  # warm-up (tiny)
        base = vmhwm_mib()
        t0 = time.perf_counter()
        cka_matrix(store, progress=False, device="cpu")
        seconds = time.perf_counter() - t0
    else:
        from ckatorch import cka_base

        wide = torch.from_numpy(store[LAYERS[-1]][:])
        cka_base(wide[:64], wide[:64], kernel="linear")  # warm-up (tiny)
        base = vmhwm_mib()
        t0 = time.perf_counter()
        cka_base(wide, wide, kernel="linear")
        seconds = time.perf_counter() - t0
    peak = vmhwm_mib()
    print("RESULT " + json.dumps({"seconds": seconds, "peak": peak, "base": base}), flush=True)
    return 0


def measure(kind: str, path: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", kind, "--worker-store", str(path),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {kind} worker failed (exit {proc.returncode}): {proc.stderr[-600:]}", flush=True)
    return None


# --------------------------------------------------------------------------- sections


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare_matrix(store: ActivationStore, args: argparse.Namespace) -> None:
    feats = layers_in_memory(store)
    n = len(store)
    for debiased in (False, True):
        name = "debiased" if debiased else "biased"
        print(f"\n1{'b' if debiased else 'a'}. {name} linear CKA, 19 x 19 layers, N = {n}",
              flush=True)
        cka_matrix(store, debiased=debiased, progress=False, device=args.device)  # warm-up
        ours_t, cached_t = [], []
        ours = cached = None
        for r in range(args.repeats):
            order = ("ours", "cached") if r % 2 == 0 else ("cached", "ours")
            for impl in order:
                if impl == "ours":
                    t, res = timed(lambda d=debiased: cka_matrix(
                        store, debiased=d, progress=False, device=args.device))
                    ours = res.matrix
                    ours_t.append(t)
                else:
                    t, cached = timed(lambda d=debiased: ckatorch_cached(feats, d))
                    cached_t.append(t)
                print(f"    repeat {r + 1}/{args.repeats} {impl:<16} {t:8.2f} s ({load_text()})",
                      flush=True)
        as_is_t = None
        if not (debiased and args.skip_debiased_as_is):
            as_is_t, as_is = timed(lambda d=debiased: ckatorch_as_is(feats, d))
            print(f"    once       ckatorch as is   {as_is_t:8.2f} s ({load_text()})", flush=True)
            diff_as_is = float(np.abs(as_is - ours).max())
        diff_cached = float(np.abs(cached - ours).max())
        med = statistics.median(ours_t)
        print(f"  dissect cka_matrix: {med:.2f} s (median of {len(ours_t)}, min "
              f"{min(ours_t):.2f})")
        print(f"  ckatorch cached (19 Gram matrices in memory): "
              f"{statistics.median(cached_t):.2f} s (min {min(cached_t):.2f}) -> ratio "
              f"{statistics.median(cached_t) / med:.1f}x [min/min "
              f"{min(cached_t) / min(ours_t):.1f}x]; max |diff| = {diff_cached:.2e}")
        if as_is_t is not None:
            print(f"  ckatorch as is (cka_base, 190 calls, once): {as_is_t:.2f} s -> ratio "
                  f"{as_is_t / med:.1f}x [to our min {as_is_t / min(ours_t):.1f}x]; max |diff| "
                  f"= {diff_as_is:.2e}")
        else:
            print("  ckatorch as is: skipped for the debiased form in this mode "
                  "(--skip-debiased-as-is)")
        worst = max(diff_cached, diff_as_is if as_is_t is not None else 0.0)
        print(f"  equal results: {'yes' if worst <= EQUAL_TARGET else 'NO'} (max |diff| "
              f"{worst:.1e}, target <= {EQUAL_TARGET:.0e}); time target >= {TIME_TARGET:.0f}x",
              flush=True)


def memory_scaling(args: argparse.Namespace) -> None:
    folder = Path(tempfile.gettempdir()) / "dissect-bench-similarity"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\n2. peak memory against N (fresh subprocess each; synthetic rows, 19 widths, "
          f"{sum(WIDTHS)} features; RAM {RAM_BYTES / 2**30:.1f} GiB)", flush=True)
    print(f"  {'N':>7} | {'ours s':>7} {'peak MiB':>9} {'+MiB':>7} | {'ckatorch 1 call s':>17} "
          f"{'peak MiB':>9} {'+MiB':>7} {'190 pairs s (extrap.)':>22}")
    for n in args.sizes:
        path = synthetic_store(n, folder)
        ours = measure("ours", path)
        gram_gib = 8 * n * n / 2**30
        need = 3 * 8 * n * n  # two Gram matrices and a centred copy alive at once, at least
        theirs = measure("ckatorch", path) if need < 0.8 * RAM_BYTES else None
        left = (f"{ours['seconds']:7.2f} {ours['peak']:9.0f} {ours['peak'] - ours['base']:7.0f}"
                if ours else f"{'failed':>25}")
        if theirs:
            right = (f"{theirs['seconds']:17.2f} {theirs['peak']:9.0f} "
                     f"{theirs['peak'] - theirs['base']:7.0f} {190 * theirs['seconds']:22.0f}")
        else:
            right = (f"not run: needs >= {need / 2**30:.0f} GiB (Gram matrices of "
                     f"{gram_gib:.1f} GiB each)")
        print(f"  {n:>7} | {left} | {right}", flush=True)


def compare_twonn(store: ActivationStore, args: argparse.Namespace) -> None:
    try:
        import skdim
    except ImportError:
        print("\n3. scikit-dimension is not installed (pip install scikit-dimension): skipped")
        return
    print(f"\n3. TwoNN intrinsic dimension of the 19 layers, N = {len(store)} (all rows)",
          flush=True)
    ours_s = theirs_s = 0.0
    worst = 0.0
    print(f"  {'layer':<12} {'dissect':>8} {'skdim':>8}")
    for name in LAYERS:
        x = store[name][:].astype(np.float64)
        t, ours = timed(lambda n=name: intrinsic_dimension(store, n, max_rows=None,
                                                           progress=False, device=args.device))
        ours_s += t
        t, theirs = timed(lambda x=x: skdim.id.TwoNN().fit(x).dimension_)
        theirs_s += t
        worst = max(worst, abs(ours - theirs) / abs(theirs))
        print(f"  {name:<12} {ours:8.3f} {theirs:8.3f}")
    print(f"  time: dissect {ours_s:.2f} s (reads the store), skdim {theirs_s:.2f} s (rows in "
          f"memory); largest relative difference {worst:.1e} (equal: "
          f"{'yes' if worst <= 1e-6 else 'NO'})", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 500 images, 1 repeat, N = 500, 2000, 8000")
    p.add_argument("--images", type=int, default=2000, help="synthetic images (2000)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (112)")
    p.add_argument("--store", default=None, help="cached store path (default: temp folder)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed repeats (3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both sides (default: torch's own)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000],
                   help="rows of the memory measurements (2000 8000 32000)")
    p.add_argument("--skip-debiased-as-is", action="store_true",
                   help="time ckatorch's per-pair cka_base for the biased form only")
    p.add_argument("--device", default="cpu", help="where ours computes (cpu)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        if args.images == p.get_default("images"):
            args.images = 500
        if args.repeats == p.get_default("repeats"):
            args.repeats = 1
        if args.sizes == p.get_default("sizes"):
            args.sizes = [500, 2000, 8000]
    elif args.images >= 2000:
        args.skip_debiased_as_is = True  # ~1 s per call at N = 2000: the cached form shows it
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import ckatorch  # noqa: F401
    except ImportError:
        print("ckatorch is not installed: pip install -e '.[bench]'; nothing to do")
        return 0
    device = torch.device(args.device)
    peers = (f"ckatorch {dist_version('ckatorch')}, scikit-dimension "
             f"{dist_version('scikit-dimension')}, numpy {np.__version__}")
    print(common_machine_text(device, peers), flush=True)
    print(NOISE_NOTE, flush=True)
    store = get_store(args)
    compare_matrix(store, args)
    memory_scaling(args)
    compare_twonn(store, args)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
