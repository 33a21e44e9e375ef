"""Benchmark ``dissect.actmax.visualize`` against torch-lucent's ``render_vis``.

What it measures
----------------
Feature visualizations of C channels (16 by default) of one layer (``features.10``) of the
real ImageNet MobileNetV2 (``load_model("mobilenet_v2-imagenet")``), 128 px images, 256 Adam
steps at lr 0.05, the FFT parametrization with colour decorrelation and the standard
transforms (pad 12, jitter 8, scale 0.9-1.1, rotate +-10 degrees, jitter 4) in all three:

1. **ours**: one ``visualize(model, [(layer, u) for u in units], normalize=pre)`` call: all
   channels share one batched forward per step, stopped after ``layer``.
2. **lucent one-per-call**: ``lucent.optvis.render.render_vis(model, f"{layer}:{u}")`` once
   per channel (its usual use), each on a fresh copy of the model (lucent never removes its
   hooks; copies keep them from piling up and from slowing the other runs; copying is not
   timed).
3. **lucent batched**: one ``render_vis`` call with ``param.image(128, batch=K)`` and the
   objective ``sum(objectives.channel(layer, u, batch=i))``: lucent's own batching.

Scaled-down default, honestly: lucent needs about 20 CPU seconds per channel (256 steps at
224 px) in either form, so the complete comparison takes ~12 CPU minutes on this 2-CPU
machine (more wall time when it is shared). By default both lucent variants therefore run on
the first K = 4 channels (``--lucent-channels``) and their times are multiplied by C / K: exact
for one-per-call (independent calls), an estimate for the batched run (on a CPU a batch costs
about its size times one image; larger batches were not cheaper per image in our runs). Ours
always runs all C channels in one call. Objectives are compared over the channels each
implementation ran. ``--lucent-channels 16`` runs everything.

Note that lucent upsamples images smaller than 224 px to 224 before the model (its
``render_vis`` default) and runs the whole network every step, computing weight gradients
too; ours runs at the image's own size (after the transforms), stops after the layer,
differentiates with respect to the image only and folds BatchNorm into the convolutions of
a private copy. These are the two libraries' defaults, which is what a user gets.
``--lucent-native`` makes lucent run at 128 px too (``fixed_image_size``): equal work per
image and the same model view as ours.

**Time**: wall and process CPU time of each (after an untimed warm-up of each at 2 steps), the
ratio lucent / ours (target: >= 4x against one-per-call lucent). With other processes on the
machine the CPU-time ratio is the steadier figure; ``--threads 1`` avoids oversubscription.

**Quality**: the mean objective reached, evaluated the same way for every final image, without
transforms, by a plain forward hook on a fresh model (no dissect or lucent code): the channel's
mean activation for the image (a) at its own 128 px and (b) upsampled to 224 px as lucent's
model sees it by default. Target: ours >= lucent. All images are saved side by side in one PNG
(rows: ours, lucent one-per-call, lucent batched) for a visual check.

Timings are printed, never asserted. The load average is printed with each run.

How to run
----------
::

    .venv/bin/python benchmarks/bench_actmax.py --threads 1      # ~5 CPU minutes
    .venv/bin/python benchmarks/bench_actmax.py --quick          # 4 channels, 64 steps
    .venv/bin/python benchmarks/bench_actmax.py --lucent-channels 16 --out cmp.png  # complete

torch-lucent (and kornia 0.4.1, which it needs) come with the ``bench`` extra. lucent 0.1.8
runs unmodified on torch 2.14 (it only triggers deprecation warnings, silenced here), so no
shim is needed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_text  # noqa: E402
from _common import machine_text as common_machine_text

from dissect.actmax import make_grid, visualize  # noqa: E402
from dissect.models import load_model  # noqa: E402

TARGET = 4.0
IMPLS = ("ours", "lucent one-per-call", "lucent batched")


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out.detach().cpu()


# --------------------------------------------------------------------------- the three runs


def ours(model: torch.nn.Module, pre, layer: str, units: list[int], args: argparse.Namespace,
         steps: int) -> torch.Tensor:
    return visualize(model, [(layer, u) for u in units], size=args.size, steps=steps, lr=0.05,
                     param="fft", decorrelate=True, transforms="standard", seed=args.seed,
                     device=args.device, progress=False, normalize=pre)


def _lucent_images(result: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(result[-1])).permute(0, 3, 1, 2).float()


def lucent_one(model: torch.nn.Module, layer: str, unit: int, args: argparse.Namespace,
               steps: int) -> torch.Tensor:
    from lucent.optvis import param, render

    np.random.seed(args.seed)  # lucent draws its transforms from numpy's global state
    torch.manual_seed(args.seed)
    result = render.render_vis(model, f"{layer.replace('.', '_')}:{unit}",
                               param_f=lambda: param.image(args.size), thresholds=(steps,),
                               show_image=False, progress=False,
                               fixed_image_size=args.size if args.lucent_native else None)
    return _lucent_images(result)


def lucent_batched(model: torch.nn.Module, layer: str, units: list[int],
                   args: argparse.Namespace, steps: int) -> torch.Tensor:
    from lucent.optvis import objectives, param, render

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    name = layer.replace(".", "_")
    objective = sum(objectives.channel(name, u, batch=i) for i, u in enumerate(units))
    result = render.render_vis(model, objective,
                               param_f=lambda: param.image(args.size, batch=len(units)),
                               thresholds=(steps,), show_image=False, progress=False,
                               fixed_image_size=args.size if args.lucent_native else None)
    return _lucent_images(result)


# --------------------------------------------------------------------------- evaluation


def channel_means(model: torch.nn.Module, pre, layer: str, units: list[int],
                  images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Mean activation of ``units[i]`` for image ``i`` (no transforms), a plain forward hook."""
    module = dict(model.named_modules())[layer]
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    values = []
    try:
        with torch.no_grad():
            for k in range(0, len(images), 8):
                x = images[k:k + 8].to(args_device(model))
                if size is not None and x.shape[-1] != size:
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
                seen.clear()
                model(pre.normalize(x))
                acts = seen[0]
                idx = torch.tensor(units[k:k + 8], device=acts.device)
                rows = torch.arange(len(idx), device=acts.device)
                values.append(acts[rows, idx].mean((1, 2)).cpu())
    finally:
        handle.remove()
    return torch.cat(values)


def args_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- report


def machine_text(device: torch.device) -> str:
    try:
        import kornia
        import lucent

        versions = f"torch-lucent {getattr(lucent, '__version__', '0.1.8?')}, " \
                   f"kornia {kornia.__version__}"
    except ImportError:
        versions = "torch-lucent not installed"
    return common_machine_text(device, versions)


def save_side_by_side(path: Path, results: dict[str, torch.Tensor], units: list[int]) -> None:
    import cv2

    rows = []
    for impl, images in results.items():
        short = {"ours": "ours", "lucent one-per-call": "lucent",
                 "lucent batched": "lucent-b"}[impl]
        rows.append(make_grid(images, ncol=len(units),
                              labels=[f"{short} {u}" for u in units[:len(images)]]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke check: 4 channels, 64 steps")
    p.add_argument("--layer", default="features.10", help="MobileNetV2 layer (features.10)")
    p.add_argument("--channels", type=int, default=16, help="channels 0..C-1 (16)")
    p.add_argument("--size", type=int, default=128, help="image side (128)")
    p.add_argument("--steps", type=int, default=256, help="Adam steps (256)")
    p.add_argument("--lucent-channels", type=int, default=4,
                   help="run both lucent variants on the first K channels only and scale "
                        "their times by C/K (exact for one-per-call, whose calls are "
                        "independent; an estimate for the batched run, see the docstring); "
                        "objectives are compared with ours on those K. Default 4 keeps the run "
                        "near 5 CPU minutes; pass 16 for the complete comparison (~12 CPU min)")
    p.add_argument("--lucent-native", action="store_true",
                   help="run lucent at the image's own size (render_vis(fixed_image_size="
                        "size)) instead of its default upsampling to 224 px: equal work per "
                        "image, the same model view as ours")
    p.add_argument("--skip-batched", action="store_true", help="skip lucent's batched run")
    p.add_argument("--seed", type=int, default=0, help="seed of all three runs (0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (torch's default)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("bench-out/actmax_vs_lucent.png"),
                   help="side-by-side PNG (bench-out/actmax_vs_lucent.png)")
    args = p.parse_args(argv)
    if args.quick:
        args.channels = min(args.channels, 4)
        args.steps = min(args.steps, 64)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.lucent_channels = max(1, min(args.lucent_channels, args.channels))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")  # kornia 0.4.1 / lucent use APIs torch deprecates
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import lucent.optvis.render  # noqa: F401
    except ImportError:
        print("torch-lucent is not installed: pip install -e '.[bench]' to compare; nothing to do")
        return 0
    device = torch.device(args.device)
    print(machine_text(device), flush=True)
    model, pre = load_model("mobilenet_v2-imagenet")
    model.to(device)
    units = list(range(args.channels))
    k = args.lucent_channels
    print(f"MobileNetV2 (ImageNet) {args.layer}, channels {units[0]}-{units[-1]}, {args.size} px, "
          f"{args.steps} steps, fft + decorrelation, standard transforms; lucent runs on "
          f"{k} of {len(units)} channels", flush=True)

    print("warm-up (2 steps each, untimed) ...", flush=True)
    ours(model, pre, args.layer, units, args, 2)
    lucent_one(copy.deepcopy(model), args.layer, units[0], args, 2)
    if not args.skip_batched:
        lucent_batched(copy.deepcopy(model), args.layer, units[:k], args, 2)

    results: dict[str, torch.Tensor] = {}
    times: dict[str, tuple[float, float]] = {}
    wall, cpu, results["ours"] = timed(lambda: ours(model, pre, args.layer, units, args,
                                                    args.steps))
    times["ours"] = (wall, cpu)
    print(f"  ours                 {wall:8.1f} s wall {cpu:8.1f} s CPU  ({load_text()})",
          flush=True)

    walls, cpus, images = [], [], []
    for u in units[:k]:
        fresh = copy.deepcopy(model)
        wall, cpu, out = timed(lambda u=u, m=fresh: lucent_one(m, args.layer, u, args,
                                                               args.steps))
        walls.append(wall)
        cpus.append(cpu)
        images.append(out)
        print(f"    lucent channel {u:<4} {wall:8.1f} s wall {cpu:8.1f} s CPU  ({load_text()})",
              flush=True)
    scale = len(units) / k
    times["lucent one-per-call"] = (sum(walls) * scale, sum(cpus) * scale)
    results["lucent one-per-call"] = torch.cat(images)
    print(f"  lucent one-per-call  {sum(walls) * scale:8.1f} s wall {sum(cpus) * scale:8.1f} s "
          f"CPU{f' (scaled from {k} channels)' if k < len(units) else ''}", flush=True)

    if not args.skip_batched:
        fresh = copy.deepcopy(model)
        wall, cpu, results["lucent batched"] = timed(
            lambda: lucent_batched(fresh, args.layer, units[:k], args, args.steps))
        times["lucent batched"] = (wall * scale, cpu * scale)
        print(f"    lucent batched, {k} channels {wall:8.1f} s wall {cpu:8.1f} s CPU  "
              f"({load_text()})", flush=True)
        print(f"  lucent batched       {wall * scale:8.1f} s wall {cpu * scale:8.1f} s "
              f"CPU{f' (scaled from {k} channels)' if k < len(units) else ''}", flush=True)

    clean = copy.deepcopy(model)  # no lucent hooks, nothing of ours: a plain forward hook
    quality = {}
    for impl, imgs in results.items():
        chosen = units[:len(imgs)]
        quality[impl] = (channel_means(clean, pre, args.layer, chosen, imgs, None),
                         channel_means(clean, pre, args.layer, chosen, imgs, 224))

    view = f"{args.size} px" if args.lucent_native else "upsampled to 224 px (its default)"
    print(f"\nTime for {len(units)} channels (lucent one-per-call: "
          f"{'measured on all' if k == len(units) else f'{k} measured, scaled by {len(units)}/{k}'}"
          f"; lucent's model view: {view}). ratio = lucent / ours, wall [CPU] (target >= "
          f"{TARGET:.0f}x against one-per-call lucent). objective = mean over channels of the "
          f"channel's mean activation for its final image, no transforms, at {args.size} px and "
          "upsampled to 224 px; one-per-call lucent over its measured channels")
    head = (f"{'implementation':<22} {'wall s':>8} {'CPU s':>8} {'ratio':>16} "
            f"{'objective@' + str(args.size):>14} {'objective@224':>14}")
    print(head)
    print("-" * len(head))
    base_wall, base_cpu = times["ours"]
    for impl in results:
        wall, cpu = times[impl]
        q_native, q_224 = quality[impl]
        ratio = f"{wall / base_wall:.2f}x [{cpu / base_cpu:.2f}x]"
        print(f"{impl:<22} {wall:>8.1f} {cpu:>8.1f} {ratio:>16} "
              f"{float(q_native.mean()):>14.3f} {float(q_224.mean()):>14.3f}")
    ours_native, ours_224 = quality["ours"]
    for impl in results:
        if impl == "ours":
            continue
        q_native, q_224 = quality[impl]
        n = len(q_native)
        verdicts = []
        for label, mine, theirs in ((f"@{args.size}", ours_native[:n], q_native),
                                    ("@224", ours_224[:n], q_224)):
            ok = "ours >= lucent" if float(mine.mean()) >= float(theirs.mean()) else "ours LOWER"
            verdicts.append(f"objective{label} ours {float(mine.mean()):.3f} vs lucent "
                            f"{float(theirs.mean()):.3f} ({ok})")
        print(f"ratio {impl} / ours: time {times[impl][0] / base_wall:.2f}x wall, "
              f"{times[impl][1] / base_cpu:.2f}x CPU; {'; '.join(verdicts)}"
              + (f" [{n} channels]" if n < len(units) else ""))
    save_side_by_side(args.out, results, units)
    print(f"side-by-side images (rows: {', '.join(results)}): {args.out}")
    print(f"after the runs: {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
