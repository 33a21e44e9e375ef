"""Benchmark ``dissect.capture``: overhead over a bare forward pass, torchlens, and memory.

What it measures
----------------
1. **Overhead.** For ResNet-18 (random init) and the ImageNet MobileNetV2, four layers each,
   224 px, batch 32, float16: the wall time of ``capture(...)`` (hooks, on-device reduction,
   HDF5 writes to a fresh temp file, ``overwrite=True``, ``progress=False``) divided by the wall
   time of a *bare* forward pass of the same model over the same batches (``inference_mode``,
   no hooks, no disk). Both read the same in-memory dataset of fixed random images through a
   ``DataLoader`` with the same batch size. The runs alternate (the order rotates every
   repeat) and the medians are reported; the ratio of the minima is shown too, because the
   minimum is the figure least disturbed by other processes on a shared machine, and so is the
   ratio of process CPU time (all threads, the writer thread included).
   MobileNetV2 is also run with ``features.18`` (its last feature layer) as the fourth layer,
   so stopping the forward pass early gives capture no advantage. ViT-B/16 (random init,
   224 px, torchvision's ``vit_b_16``) captures four encoder blocks up to the last one: each
   block's tokens are rearranged into ``(768, 14, 14)`` maps and its class token stored under
   ``/prefix`` (#24). Target: <= 1.10 for every case.
2. **torchlens.** ``torchlens.extract(model, x, layers)`` on the same batches, in the same
   loop, under ``inference_mode``; it keeps float32 outputs in memory and writes nothing to
   disk. torchlens patches torch's functions while it is used; they are patched before its
   timed pass and restored after it (untimed), so the bare and capture runs see plain torch.
3. **Bounded memory.** Peak RSS (``ru_maxrss``) of a capture of N=512 and N=2048 images of
   MobileNetV2 (four layers, batch 32), each in a fresh subprocess of this script with the same
   torch thread settings; images are generated on the fly so the data does not grow with N.
   These run first, while this process is small: on Linux a child's ``ru_maxrss`` starts at
   its parent's RSS. ``VmHWM`` (not inherited) and the growth during the capture are shown too.
   Target: peak(2048) / peak(512) <= 1.10. If N=2048 would take more than 5 minutes at 224 px,
   both runs use 112 px instead (the output says so).

Timings are printed, never asserted: the script exits 0 unless something crashes.

How to run
----------
::

    .venv/bin/python benchmarks/bench_capture.py            # full run (several minutes)
    .venv/bin/python benchmarks/bench_capture.py --quick    # smoke check (about a minute)
    .venv/bin/python benchmarks/bench_capture.py --profile  # also cProfile one capture per case
    make bench                                              # every benchmarks/bench_*.py

torchlens is optional (``pip install -e '.[bench]'``); without it that column says so.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from _common import load_text  # noqa: E402
from _common import machine_text as common_machine_text
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dissect import capture

TARGET = 1.10
RSS_TIME_LIMIT_S = 300.0


@dataclass(frozen=True)
class Case:
    """One benchmarked model and layer set."""

    model: str
    layers: tuple[str, ...]
    note: str = ""


CASES = (
    Case(
        "resnet18",
        ("layer1", "layer2", "layer3", "layer4"),
        "layer4 is the last block (only avgpool+fc follow)",
    ),
    Case(
        "mobilenet_v2",
        ("features.3", "features.6", "features.13", "features.17"),
        "stops before features.18 + classifier",
    ),
    Case(
        "mobilenet_v2",
        ("features.3", "features.6", "features.13", "features.18"),
        "features.18 is the last feature layer: no early-stop gain",
    ),
    Case(
        "vit_b_16",
        ("encoder.layers.encoder_layer_2", "encoder.layers.encoder_layer_5",
         "encoder.layers.encoder_layer_8", "encoder.layers.encoder_layer_11"),
        "encoder_layer_11 is the last block (only encoder.ln + heads follow); each block's "
        "197 tokens are stored as a (768, 14, 14) map plus the class token (tokens='auto')",
    ),
)
RSS_LAYERS = ("features.3", "features.6", "features.13", "features.17")


class RandomImages(Dataset):
    """``n`` fixed random ``(3, size, size)`` images; image ``i`` depends only on ``(seed, i)``.

    With ``cache=True`` all images are generated once and kept in memory (timing runs: no
    generation cost inside the timed loop); otherwise each is generated on access (memory runs:
    the dataset itself does not grow with ``n``).
    """

    def __init__(self, n: int, size: int, seed: int = 0, cache: bool = False) -> None:
        self.n, self.size, self.seed = n, size, seed
        self.images = torch.stack([self._make(i) for i in range(n)]) if cache else None

    def _make(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(3, self.size, self.size, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.images[i] if self.images is not None else self._make(i)


def build_model(name: str) -> nn.Module:
    """ResNet-18 or ViT-B/16 with seeded random weights, or torchvision's ImageNet
    MobileNetV2."""
    if name == "resnet18":
        torch.manual_seed(0)
        model = torchvision.models.resnet18()
    elif name == "vit_b_16":
        torch.manual_seed(0)
        model = torchvision.models.vit_b_16()
    elif name == "mobilenet_v2":
        from dissect.models import load_model

        model, _ = load_model("mobilenet_v2-imagenet")
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    """``ru_maxrss`` of this process so far, in MiB.

    On Linux a child's ``ru_maxrss`` starts at its parent's RSS at fork time, so the memory
    runs are spawned before the parent grows, and :func:`hwm_mib` is reported alongside.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def hwm_mib() -> float | None:
    """Linux's ``VmHWM`` (peak RSS of this process image, not inherited), in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- timed runs


class Timer:
    """Wall time and process CPU time (all threads: torch's, the writer's) of a block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


Timing = tuple[float, float]  # (wall s, CPU s)


def run_bare(model: nn.Module, data: Dataset, batch_size: int, device: torch.device) -> Timing:
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    with Timer(device) as t, torch.inference_mode():
        for x in loader:
            model(x.to(device, non_blocking=True))
    return t.wall, t.cpu


def run_capture(
    model: nn.Module,
    data: Dataset,
    layers: tuple[str, ...],
    batch_size: int,
    device: torch.device,
    path: Path,
) -> Timing:
    with Timer(device) as t:
        store = capture(
            model,
            data,
            list(layers),
            path,
            batch_size=batch_size,
            dtype="float16",
            device=device,
            progress=False,
            overwrite=True,
        )
    if not store.complete or store.n_samples != len(data):
        raise RuntimeError(f"capture left an incomplete store: {store!r}")
    store.close()
    path.unlink()
    return t.wall, t.cpu


class TorchLens:
    """torchlens' ``extract``, with its patching of torch confined to its own timed runs."""

    def __init__(self) -> None:
        import torchlens

        self.tl = torchlens
        self.version = getattr(torchlens, "__version__", "?")
        self.wrap: Callable[[], None] | None = None
        self.unwrap: Callable[[], None] | None = None
        try:
            from torchlens.backends.torch.wrappers import unwrap_torch, wrap_torch
        except ImportError:  # another torchlens layout: its patches then stay in place
            pass
        else:
            self.wrap, self.unwrap = wrap_torch, unwrap_torch
        self.pristine = self._probe()

    @staticmethod
    def _probe() -> tuple[object, ...]:
        return (torch.add, torch.Tensor.__add__, torch.nn.functional.conv2d, torch.relu)

    def torch_is_pristine(self) -> bool:
        return all(a is b for a, b in zip(self._probe(), self.pristine, strict=True))

    def restore(self) -> None:
        if self.unwrap is not None and not self.torch_is_pristine():
            self.unwrap()

    def run(
        self,
        model: nn.Module,
        data: Dataset,
        layers: tuple[str, ...],
        batch_size: int,
        device: torch.device,
    ) -> Timing:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
        if self.wrap is not None:
            self.wrap()  # a one-off cost per process for torchlens users: kept out of the timing
        try:
            with Timer(device) as t, torch.inference_mode():
                for x in loader:
                    out = self.tl.extract(model, x.to(device, non_blocking=True), list(layers))
                    if len(out) != len(layers):
                        raise RuntimeError(f"torchlens returned {sorted(out)} for {layers}")
                    del out
        finally:
            self.restore()
        return t.wall, t.cpu


@dataclass
class Result:
    case: Case
    runs: dict[str, list[Timing]] = field(
        default_factory=lambda: {"bare": [], "capture": [], "torchlens": []}
    )
    torchlens_error: str | None = None

    def ratios(self, name: str) -> tuple[float, float, float] | None:
        """``name`` against bare: (median wall / median wall, min / min, median CPU ratio)."""
        runs, bare = self.runs[name], self.runs["bare"]
        if not runs or not bare:
            return None
        med = statistics.median(w for w, _ in runs) / statistics.median(w for w, _ in bare)
        low = min(w for w, _ in runs) / min(w for w, _ in bare)
        cpu = statistics.median(c for _, c in runs) / statistics.median(c for _, c in bare)
        return med, low, cpu


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def benchmark_case(
    case: Case,
    model: nn.Module,
    data: Dataset,
    args: argparse.Namespace,
    device: torch.device,
    tmp: Path,
    tl: TorchLens | None,
) -> Result:
    result = Result(case)
    bs = args.batch_size
    warm = Subset(data, range(min(len(data), bs)))
    run_bare(model, warm, bs, device)  # warm-up: allocator, kernels, lazy imports
    run_capture(model, warm, case.layers, bs, device, tmp / "warmup.h5")
    if tl is not None:
        try:
            tl.run(model, warm, case.layers, bs, device)
        except Exception as exc:  # report it honestly and go on with the rest
            result.torchlens_error = short_error(exc)
            tl.restore()

    runners: list[tuple[str, Callable[[int], Timing]]] = [
        ("bare", lambda r: run_bare(model, data, bs, device)),
        ("capture", lambda r: run_capture(model, data, case.layers, bs, device, tmp / f"{r}.h5")),
    ]
    if tl is not None:
        runners.append(("torchlens", lambda r: tl.run(model, data, case.layers, bs, device)))
    for r in range(args.repeats):
        shift = r % len(runners)
        for name, fn in runners[shift:] + runners[:shift]:
            if name == "torchlens" and (
                result.torchlens_error is not None or r >= args.torchlens_repeats
            ):
                continue
            gc.collect()
            try:
                wall, cpu = fn(r)
            except Exception as exc:
                if name != "torchlens":
                    raise
                result.torchlens_error = short_error(exc)
                continue
            result.runs[name].append((wall, cpu))
            print(
                f"    repeat {r + 1}/{args.repeats} {name:<9} {wall:7.2f} s wall {cpu:7.2f} s CPU",
                flush=True,
            )
    if tl is not None and not tl.torch_is_pristine():
        print("    WARNING: torchlens' patches of torch are still in place; later timings suffer")
    return result


def profile_capture(
    case: Case,
    model: nn.Module,
    data: Dataset,
    args: argparse.Namespace,
    device: torch.device,
    tmp: Path,
) -> None:
    """cProfile one capture and print where the main thread's time goes."""
    prof = cProfile.Profile()
    prof.enable()
    run_capture(model, data, case.layers, args.batch_size, device, tmp / "profile.h5")
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    print(
        f"\ncProfile of one capture, {case.model} {','.join(case.layers)} "
        "(by own time; main thread only, the writer thread is not profiled):"
    )
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
    print("\n".join("  " + ln for ln in [lines[0], *lines[start:]]))


# --------------------------------------------------------------------------- memory runs


def rss_child(args: argparse.Namespace) -> None:
    """Body of the ``--rss-child N`` subprocess: one capture, then a JSON line on stdout."""
    device = torch.device(args.device)
    model = build_model("mobilenet_v2")
    data = RandomImages(args.rss_child, args.size, seed=1, cache=False)
    before, hwm_before = peak_rss_mib(), hwm_mib()
    with tempfile.TemporaryDirectory(prefix="bench-rss-", dir=args.tmpdir) as tmp:
        t0 = time.perf_counter()
        store = capture(
            model,
            data,
            list(RSS_LAYERS),
            Path(tmp) / "rss.h5",
            batch_size=args.batch_size,
            dtype="float16",
            device=device,
            progress=False,
            overwrite=True,
        )
        elapsed = time.perf_counter() - t0
        complete, rows = store.complete, store.n_written
        store.close()
    out = {
        "n": args.rss_child,
        "size": args.size,
        "wall_s": elapsed,
        "maxrss_before": before,
        "maxrss": peak_rss_mib(),
        "hwm_before": hwm_before,
        "hwm": hwm_mib(),
        "complete": complete,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
    }
    print("RSS-RESULT " + json.dumps(out), flush=True)


def spawn_rss(n: int, size: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(n)]
    cmd += ["--size", str(size), "--batch-size", str(args.batch_size), "--device", args.device]
    cmd += ["--threads", str(torch.get_num_threads())]
    cmd += ["--interop-threads", str(torch.get_num_interop_threads())]
    if args.tmpdir:
        cmd += ["--tmpdir", args.tmpdir]
    print(f"  memory run N={n} at {size} px ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RSS-RESULT "):
            result = json.loads(line.removeprefix("RSS-RESULT "))
            if not result["complete"] or result["rows"] != n:
                raise RuntimeError(f"memory run N={n} left an incomplete store: {result}")
            return result
    raise RuntimeError(
        f"memory subprocess N={n} failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def measure_memory(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Two captures of different sizes in fresh subprocesses: (results, notes)."""
    small, large = args.rss_n
    size, notes = args.rss_size, []
    first = spawn_rss(small, size, args)
    estimate = first["wall_s"] * large / small
    if size > 112 and estimate > RSS_TIME_LIMIT_S:
        notes.append(
            f"N={large} at {size} px would take about {estimate:.0f} s (> "
            f"{RSS_TIME_LIMIT_S:.0f} s): both memory runs use 112 px instead"
        )
        size = 112
        first = spawn_rss(small, size, args)
    return [first, spawn_rss(large, size, args)], notes


def print_memory(results: list[dict], notes: list[str], batch_size: int) -> None:
    a, b = results
    print(
        f"\nPeak RSS of one capture, each in a fresh subprocess: MobileNetV2 (ImageNet), "
        f"{','.join(RSS_LAYERS)}, {a['size']} px, batch {batch_size}, float16, images "
        f"generated on the fly; torch threads {a['threads']} (interop {a['interop']})"
    )
    for note in notes:
        print(f"  NOTE: {note}")
    head = (
        f"  {'N':>6} {'wall s':>8} {'ru_maxrss MiB':>14} {'VmHWM MiB':>10} "
        f"{'VmHWM before capture':>21} {'growth in capture':>18}"
    )
    print(head)
    for r in results:
        hwm = f"{r['hwm']:.0f}" if r["hwm"] is not None else "n/a"
        before = f"{r['hwm_before']:.0f}" if r["hwm_before"] is not None else "n/a"
        growth = f"{r['hwm'] - r['hwm_before']:.0f}" if r["hwm"] is not None else "n/a"
        print(
            f"  {r['n']:>6} {r['wall_s']:>8.1f} {r['maxrss']:>14.0f} {hwm:>10} {before:>21} "
            f"{growth:>18}"
        )
    ratio = b["maxrss"] / a["maxrss"]
    line = f"  peak RSS N={b['n']} / N={a['n']}: ru_maxrss {ratio:.3f}"
    if a["hwm"] is not None and b["hwm"] is not None:
        line += f", VmHWM {b['hwm'] / a['hwm']:.3f}"
    print(line + f"  (target <= {TARGET:.2f})")


# --------------------------------------------------------------------------- main


def machine_text(device: torch.device) -> str:
    import h5py

    return common_machine_text(
        device, f"torchvision {torchvision.__version__}, h5py {h5py.__version__}")


def print_table(results: list[Result], tl_version: str | None) -> None:
    print(
        f"\nTime relative to a bare forward pass (target for capture: <= {TARGET:.2f}). "
        "wall = median/median [min/min]; CPU = process CPU time, median/median"
    )
    head = (
        f"{'model':<13} {'layers':<44} {'bare s':>6} {'capture s':>9} {'capture/bare':>15} "
        f"{'CPU':>5} {'torchlens s':>11} {'torchlens/bare':>15} {'CPU':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        bare = statistics.median(w for w, _ in r.runs["bare"])
        cap = statistics.median(w for w, _ in r.runs["capture"])
        c_med, c_min, c_cpu = r.ratios("capture")
        tl = r.ratios("torchlens")
        if r.torchlens_error:
            tl_text = f"{'failed':>11} {'':>15} {'':>5}"
        elif tl is None:
            tl_text = f"{'n/a':>11} {'':>15} {'':>5}"
        else:
            tl_s = statistics.median(w for w, _ in r.runs["torchlens"])
            tl_text = f"{tl_s:>11.2f} {f'{tl[0]:.2f} [{tl[1]:.2f}]':>15} {tl[2]:>5.2f}"
        print(
            f"{r.case.model:<13} {','.join(r.case.layers):<44} {bare:>6.2f} {cap:>9.2f} "
            f"{f'{c_med:.3f} [{c_min:.3f}]':>15} {c_cpu:>5.2f} {tl_text}"
        )
    for r in results:
        print(f"  {r.case.model} up to {r.case.layers[-1]}: {r.case.note}")
        if r.torchlens_error:
            print(f"    torchlens failed on it: {r.torchlens_error}")
    if tl_version:
        print(
            f"  torchlens {tl_version}: torchlens.extract(model, x, layers) per batch under "
            "inference_mode; keeps float32 in memory, writes nothing to disk"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke check: N=32, 1 repeat, small memory runs"
    )
    p.add_argument("--n", type=int, default=128, help="images per timed run (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats (default 5)")
    p.add_argument(
        "--torchlens-repeats", type=int, default=3, help="repeats of torchlens (default 3)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument(
        "--rss-n",
        type=int,
        nargs=2,
        default=(512, 2048),
        metavar=("SMALL", "LARGE"),
        help="dataset sizes of the two memory runs (default 512 2048)",
    )
    p.add_argument(
        "--rss-size", type=int, default=None, help="image side of the memory runs (default --size)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tmpdir", default=None, help="where the HDF5 files go (default: $TMPDIR)")
    p.add_argument("--skip-torchlens", action="store_true")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="only these models' cases (resnet18, mobilenet_v2, vit_b_16)")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument(
        "--profile", action="store_true", help="also cProfile one capture per case and print it"
    )
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--interop-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.torchlens_repeats = 32, 1, 1
        args.rss_n, args.rss_size = (64, 256), 112
    if args.rss_size is None:
        args.rss_size = args.size
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        rss_child(args)
        return 0
    device = torch.device(args.device)
    print(machine_text(device), flush=True)

    memory: tuple[list[dict], list[str]] | None = None
    if not args.skip_rss:  # first, while this process is small (see peak_rss_mib)
        print(f"memory runs: N={args.rss_n[0]} and N={args.rss_n[1]}", flush=True)
        memory = measure_memory(args)

    tl, tl_version = None, None
    if not args.skip_torchlens:
        try:
            tl = TorchLens()
            tl_version = tl.version
        except ImportError as exc:
            print(f"torchlens is not installed ({exc}): pip install -e '.[bench]' to compare")
    print(
        f"timed runs: N={args.n} fixed random images 3x{args.size}x{args.size}, batch "
        f"{args.batch_size}, float16, {args.repeats} repeats (torchlens "
        f"{min(args.repeats, args.torchlens_repeats)}), order rotated every repeat",
        flush=True,
    )
    data = RandomImages(args.n, args.size, seed=0, cache=True)
    results = []
    models: dict[str, nn.Module] = {}
    with tempfile.TemporaryDirectory(prefix="bench-capture-", dir=args.tmpdir) as tmpdir:
        tmp = Path(tmpdir)
        print(f"HDF5 files go to {tmp}", flush=True)
        cases = [c for c in CASES if args.models is None or c.model in args.models]
        for case in cases:
            if case.model not in models:
                models[case.model] = build_model(case.model).to(device)
            print(f"  {case.model} {','.join(case.layers)}", flush=True)
            results.append(benchmark_case(case, models[case.model], data, args, device, tmp, tl))
        print(f"after the timed runs: {load_text()} (a high load makes the ratios noisy)")
        print_table(results, tl_version)
        if memory is not None:
            print_memory(*memory, args.batch_size)
        if args.profile:
            for case in cases:
                profile_capture(case, models[case.model], data, args, device, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
