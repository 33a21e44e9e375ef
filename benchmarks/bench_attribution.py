"""Benchmark ``dissect.attribution`` against captum: Integrated Gradients and occlusion.

What it measures
----------------
The real ImageNet MobileNetV2 (``load_model("mobilenet_v2-imagenet")``) on a batch of 8 real
photographs (``SampleImages`` with the model's transform: resize 256, centre crop 224), each
explained for its own top-1 class:

1. **Time.** ``integrated_gradients(model, x, targets, steps=50, method="gausslegendre",
   batch_size=R)`` against captum's ``IntegratedGradients(model).attribute(x, target=targets,
   n_steps=50, method="gausslegendre", internal_batch_size=R)``, and ``occlusion(model, x,
   targets, window=(3, 56, 56), stride=(3, 28, 28), batch_size=R)`` against captum's
   ``Occlusion(model).attribute(..., sliding_window_shapes=(3, 56, 56), strides=(3, 28, 28),
   perturbations_per_eval=R // 8)``: both evaluate the same R rows per forward pass (R = 32
   by default). The two run alternately (the order flips every repeat) after an untimed
   warm-up: a small call of each, and one pass of the model at every batch shape the timed
   calls use (the first pass at a new shape builds the convolution kernels, seconds on a
   CPU). The table gives the median and minimum wall time and the median process CPU time,
   and the ratio captum / dissect (target >= 1.0: never slower). The minimum is the
   figure least disturbed by other processes; this machine may be shared with other
   benchmarks, so read the medians with the load average printed next to them.
   The two results are also compared (max |dissect - captum| / max |captum|).
2. **Peak memory at equal batch size.** Each method and implementation runs once in a fresh
   subprocess of this script (same thread settings). The peak resident set is reset just
   before the call (``/proc/self/clear_refs``) and read after it (``VmHWM``): the table shows
   the growth over the resident set before the call (model, images, torch already loaded)
   and the absolute peak. This is CPU memory of the whole process (torch's CPU allocations
   included, which ``tracemalloc`` would not see); on CUDA, ``torch.cuda.max_memory_allocated``
   is shown too. captum's own default for IG (``internal_batch_size=None``) evaluates all
   ``50 * 8`` interpolated rows in one pass; it is not run here (tens of GB at 224 px).

Timings are printed, never asserted: the script exits 0 unless something crashes.

How to run
----------
::

    .venv/bin/python benchmarks/bench_attribution.py            # full run (10+ minutes on 2 CPUs)
    .venv/bin/python benchmarks/bench_attribution.py --quick    # smoke check (about a minute)
    .venv/bin/python benchmarks/bench_attribution.py --batch-size 64 --repeats 5
    make bench                                                  # every benchmarks/bench_*.py

captum comes with the ``bench`` (and ``test``) extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import NOISE_NOTE, load_text, version_of  # noqa: E402
from _common import machine_text as common_machine_text

from dissect.attribution import integrated_gradients, occlusion  # noqa: E402
from dissect.datasets import SampleImages  # noqa: E402
from dissect.models import load_model  # noqa: E402

TARGET = 1.0
METHODS = ("ig", "occlusion")
IMPLS = ("dissect", "captum")


# --------------------------------------------------------------------------- the runs


def load_batch(n: int, device: torch.device, channels_last: bool = False
               ) -> tuple[torch.nn.Module, torch.Tensor, list[int]]:
    """MobileNetV2 (ImageNet), ``n`` real photographs (cycled if fewer), their top-1 classes.

    With ``channels_last`` the batch is in channels-last memory format (both implementations
    get the same tensor; both keep the format through their perturbed rows).
    """
    model, transform = load_model("mobilenet_v2-imagenet")
    model.to(device)
    data = SampleImages(transform)
    x = torch.stack([data[i % len(data)]["image"] for i in range(n)]).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        targets = model(x).argmax(1).tolist()
    return model, x, targets


def make_call(method: str, impl: str, model: torch.nn.Module, x: torch.Tensor,
              targets: list[int], args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """A zero-argument function running one attribution of the whole batch."""
    dev = x.device
    window = (3, args.window, args.window)
    stride = (3, args.stride, args.stride)
    if impl == "captum":
        from captum.attr import IntegratedGradients, Occlusion

        if method == "ig":
            return lambda: IntegratedGradients(model).attribute(
                x, target=targets, n_steps=args.steps, method="gausslegendre",
                internal_batch_size=args.batch_size)
        return lambda: Occlusion(model).attribute(
            x, target=targets, sliding_window_shapes=window, strides=stride, baselines=0.0,
            perturbations_per_eval=max(1, args.batch_size // len(x)))
    if method == "ig":
        return lambda: integrated_gradients(
            model, x, targets, steps=args.steps, method="gausslegendre",
            batch_size=args.batch_size, device=dev, progress=False)
    return lambda: occlusion(model, x, targets, window=window, stride=stride, baseline=0.0,
                             batch_size=args.batch_size, device=dev, progress=False)


def rows(method: str, args: argparse.Namespace) -> int:
    """Model evaluations of one call (per image), to show how big the work is."""
    if method == "ig":
        return args.steps
    side = 224
    per_dim = -(-(side - args.window) // args.stride) + 1
    return per_dim * per_dim


def timed(
    fn: Callable[[], torch.Tensor], device: torch.device
) -> tuple[float, float, torch.Tensor]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out.detach()


def pass_sizes(method: str, batch: int, args: argparse.Namespace) -> set[int]:
    """Rows per forward pass that either implementation uses for this call."""
    per_image = rows(method, args)
    total, r = per_image * batch, args.batch_size
    ours = {r if total >= r else total, total % r} - {0}
    per = max(1, r // batch)  # captum batches whole steps / perturbations of all images
    theirs = {per * batch, (per_image % per) * batch} - {0}
    return ours | theirs | {batch}  # the unperturbed inputs (occlusion, IG's delta)


def warm_up(method: str, model: torch.nn.Module, x: torch.Tensor,
            args: argparse.Namespace) -> None:
    """Run the model once at every batch shape of the timed calls (untimed).

    The first pass at a new shape builds oneDNN/cuDNN kernels (seconds on a CPU), which would
    otherwise land on whichever implementation runs first.
    """
    for n in sorted(pass_sizes(method, len(x), args)):
        xs = x[torch.arange(n) % len(x)].clone()
        if method == "ig":
            xs.requires_grad_(True)
            torch.autograd.grad(model(xs)[:, 0].sum(), xs)
        else:
            with torch.no_grad():
                model(xs)
            with torch.inference_mode():
                model(xs)


def time_method(method: str, model: torch.nn.Module, x: torch.Tensor, targets: list[int],
                args: argparse.Namespace) -> dict:
    calls = {impl: make_call(method, impl, model, x, targets, args) for impl in IMPLS}
    small = argparse.Namespace(**{**vars(args), "steps": 2, "window": 112, "stride": 112})
    for impl in IMPLS:  # lazy imports and first-call costs of each implementation
        make_call(method, impl, model, x[:1], targets[:1], small)()
    warm_up(method, model, x, args)
    runs: dict[str, list[tuple[float, float]]] = {impl: [] for impl in IMPLS}
    outputs: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            wall, cpu, out = timed(calls[impl], x.device)
            runs[impl].append((wall, cpu))
            outputs[impl] = out
            print(f"    repeat {r + 1}/{args.repeats} {method:<9} {impl:<7} {wall:7.2f} s wall "
                  f"{cpu:7.2f} s CPU  ({load_text()})", flush=True)
    ref = outputs["captum"]
    agreement = float((outputs["dissect"] - ref).abs().max() / ref.abs().max())
    return {"method": method, "runs": runs, "agreement": agreement}


# --------------------------------------------------------------------------- memory


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> None:
    """Body of ``--memory-child METHOD IMPL``: one call, then a JSON line on stdout."""
    method, impl = args.memory_child
    device = torch.device(args.device)
    model, x, targets = load_batch(args.images, device, args.channels_last)
    fn = make_call(method, impl, model, x, targets, args)
    gc.collect()
    reset = _reset_peak()
    before = _status_mib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    wall, _, _ = timed(fn, device)
    result = {
        "method": method, "impl": impl, "wall_s": wall, "rss_before": before,
        "hwm": _status_mib("VmHWM"), "reset": reset,
    }
    if device.type == "cuda":
        result["cuda_peak"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    print("MEMORY-RESULT " + json.dumps(result), flush=True)


def spawn_memory(method: str, impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", method, impl]
    cmd += ["--device", args.device, "--images", str(args.images), "--steps", str(args.steps)]
    cmd += ["--batch-size", str(args.batch_size), "--window", str(args.window)]
    cmd += ["--stride", str(args.stride), "--threads", str(torch.get_num_threads())]
    cmd += ["--channels-last"] if args.channels_last else []
    print(f"  memory run: {method} {impl} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY-RESULT "):
            return json.loads(line.removeprefix("MEMORY-RESULT "))
    raise RuntimeError(f"memory subprocess {method} {impl} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# --------------------------------------------------------------------------- report


def machine_text(device: torch.device) -> str:
    return common_machine_text(device, f"captum {version_of('captum')}")


def print_times(results: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nTime of one attribution of {args.images} images at 224 px, {args.batch_size} rows per "
        f"forward pass for both; {args.repeats} alternating repeats. ratio = captum / dissect "
        f"(target >= {TARGET:.1f}), median/median [min/min]; CPU = process CPU time"
    )
    head = (f"{'method':<34} {'rows/image':>10} {'dissect s':>10} {'captum s':>9} "
            f"{'ratio':>15} {'CPU ratio':>9} {'max rel diff':>12}")
    print(head)
    print("-" * len(head))
    for r in results:
        ours, theirs = r["runs"]["dissect"], r["runs"]["captum"]
        med = statistics.median(w for w, _ in theirs) / statistics.median(w for w, _ in ours)
        low = min(w for w, _ in theirs) / min(w for w, _ in ours)
        cpu = statistics.median(c for _, c in theirs) / statistics.median(c for _, c in ours)
        label = (f"IG gausslegendre, {args.steps} steps" if r["method"] == "ig" else
                 f"occlusion {args.window}px window, stride {args.stride}")
        print(f"{label:<34} {rows(r['method'], args):>10} "
              f"{statistics.median(w for w, _ in ours):>10.2f} "
              f"{statistics.median(w for w, _ in theirs):>9.2f} "
              f"{f'{med:.3f} [{low:.3f}]':>15} {cpu:>9.3f} {r['agreement']:>12.1e}")


def print_memory(results: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nPeak memory of one call in a fresh subprocess ({args.images} images, "
        f"{args.batch_size} rows per pass for both): growth = VmHWM after the call - VmRSS "
        "before it (model, images and torch loaded)"
    )
    if not all(r["reset"] for r in results):
        print("  NOTE: /proc/self/clear_refs was not writable: VmHWM includes loading the model")
    cuda = any("cuda_peak" in r for r in results)
    head = (f"  {'method':<10} {'impl':<8} {'wall s':>7} {'RSS before MiB':>15} "
            f"{'peak growth MiB':>16} {'VmHWM MiB':>10}" + (f" {'CUDA peak MiB':>14}" if cuda
                                                            else ""))
    print(head)
    for r in results:
        growth = r["hwm"] - r["rss_before"] if r["hwm"] is not None else float("nan")
        line = (f"  {r['method']:<10} {r['impl']:<8} {r['wall_s']:>7.1f} {r['rss_before']:>15.0f}"
                f" {growth:>16.0f} {r['hwm']:>10.0f}")
        if cuda:
            line += f" {r.get('cuda_peak', float('nan')):>14.0f}"
        print(line)
    by = {(r["method"], r["impl"]): r for r in results}
    for method in METHODS:
        ours, theirs = by.get((method, "dissect")), by.get((method, "captum"))
        if ours and theirs:
            g_ours = ours["hwm"] - ours["rss_before"]
            g_theirs = theirs["hwm"] - theirs["rss_before"]
            print(f"  {method}: peak growth dissect / captum = {g_ours / g_theirs:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 2 images, 8 steps, 112 px windows, 1 repeat")
    p.add_argument("--images", type=int, default=8, help="images in the batch (8)")
    p.add_argument("--steps", type=int, default=50, help="IG steps (50)")
    p.add_argument("--window", type=int, default=56, help="occlusion window side (56)")
    p.add_argument("--stride", type=int, default=28, help="occlusion stride (28)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass, both (32)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed repeats (3)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--channels-last", action="store_true",
                   help="give both implementations a channels-last batch (faster CPU kernels)")
    p.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    p.add_argument("--methods", default=",".join(METHODS), help="ig,occlusion")
    p.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.window, args.stride = 2, 8, 112, 56
        args.repeats = 1 if args.repeats == p.get_default("repeats") else args.repeats
        args.batch_size = min(args.batch_size, 16)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args)
        return 0
    try:
        import captum  # noqa: F401
    except ImportError:
        print("captum is not installed: pip install -e '.[bench]' to compare; nothing to do")
        return 0
    device = torch.device(args.device)
    print(machine_text(device), flush=True)
    print(NOISE_NOTE, flush=True)

    memory: list[dict] = []
    if not args.skip_memory:  # first, while nothing else of this script runs
        print("memory runs (one fresh subprocess each):", flush=True)
        memory = [spawn_memory(m, impl, args) for m in args.methods for impl in IMPLS]

    model, x, targets = load_batch(args.images, device, args.channels_last)
    print(f"timed runs: MobileNetV2 (ImageNet), {args.images} real photographs "
          f"{tuple(x.shape)}, top-1 targets {targets}", flush=True)
    results = [time_method(m, model, x, targets, args) for m in args.methods]
    print(f"after the timed runs: {load_text()} (a load above the CPU count makes ratios noisy)")
    print_times(results, args)
    if memory:
        print_memory(memory, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
