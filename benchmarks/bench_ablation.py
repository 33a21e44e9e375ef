"""Benchmark ``dissect.ablation.ablate`` against a loop of full forward passes with a hook.

What it measures
----------------
Removing units one at a time (``mode="zero"``, ``metric="logit"``, targets = the unablated
predictions) on N images at 224 px, two cases:

1. torchvision's ResNet-18, random init (seed 0), layer ``layer3`` (256 units);
2. the real ImageNet MobileNetV2 (``load_model("mobilenet_v2-imagenet")``), layer
   ``features.13`` (96 units), on real photographs (``SampleImages`` through the model's
   transform, cycled with flips and shifts to N distinct images).

**The reference** is what one writes by hand: per unit, per batch, a full forward pass with a
``Trace(..., edit=...)`` hook that zeroes the unit, plus one unablated pass per batch; the
per-class means are accumulated the same way. **ablate** runs each batch once up to the layer
and then only the rest of the network, for several copies of the batch per pass
(:mod:`dissect.ablation.prefix`). The two are timed side by side in one process, alternately
(the order flips every repeat), after an untimed warm-up of both at every batch shape the
timed calls use; the table gives the median and minimum wall time and the ratio of the
medians (reference / ablate; target >= 3.0). Only the first ``--units`` units are ablated so
that the reference loop stays affordable on a CPU (its cost is units x images full forward
passes); both sides ablate the same units.

**Equal results are asserted** at run time: the per-class ablated logits of the two agree to
``1e-4`` relative to their largest magnitude, the baselines too (the script exits non-zero
otherwise). Timings are printed, never asserted.

How to run
----------
::

    .venv/bin/python benchmarks/bench_ablation.py            # 128 images, 8 units, 3 repeats
    .venv/bin/python benchmarks/bench_ablation.py --quick    # 16 images, 8 units, 2 repeats
    .venv/bin/python benchmarks/bench_ablation.py --images 256 --units 16 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import NOISE_NOTE, machine_text  # noqa: E402

from dissect import Trace  # noqa: E402
from dissect.ablation import ablate  # noqa: E402
from dissect.datasets import SampleImages  # noqa: E402
from dissect.models import load_model  # noqa: E402

TARGET = 3.0


def photos(n: int, transform: Callable) -> torch.Tensor:
    """``n`` distinct model inputs from the sample photographs (flips and shifts)."""
    base = torch.stack([item["image"] for item in SampleImages(transform=transform)])
    out = []
    for i in range(n):
        x = base[i % len(base)]
        variant = i // len(base)
        if variant % 2:
            x = x.flip(-1)
        out.append(torch.roll(x, shifts=(3 * (variant // 2), 5 * (variant // 2)), dims=(1, 2)))
    return torch.stack(out)


def _zero(unit: int, name: str, m: torch.Tensor) -> torch.Tensor:
    m = m.clone()
    m[:, unit] = 0
    return m


def reference(model: torch.nn.Module, x: torch.Tensor, layer: str, units: list[int],
              batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The loop of full forward passes with a hook: (classes, baseline, ablated)."""
    with torch.inference_mode():
        preds, base_vals = [], []
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size])
            t = out.argmax(1)
            preds.append(t)
            base_vals.append(out.gather(1, t[:, None])[:, 0])
        t_all = torch.cat(preds)
        rows = []
        for u in units:
            vals = []
            for j, i in enumerate(range(0, len(x), batch_size)):
                with Trace(model, layer, record=lambda n, v: None, edit=partial(_zero, u)):
                    out = model(x[i:i + batch_size])
                vals.append(out.gather(1, preds[j][:, None])[:, 0])
            rows.append(torch.cat(vals))
    classes = np.unique(t_all.numpy())
    t_np = t_all.numpy()

    def per_class(v: torch.Tensor) -> np.ndarray:
        v = v.double().numpy()
        return np.array([v[t_np == c].mean() for c in classes])

    return classes, per_class(torch.cat(base_vals)), np.stack([per_class(r) for r in rows])


def run_case(name: str, model: torch.nn.Module, x: torch.Tensor, layer: str,
             args: argparse.Namespace) -> dict:
    units = list(range(args.units))
    b = args.batch_size
    model.eval()

    def ours() -> object:
        return ablate(model, x, layer, units, metric="logit", batch_size=b, progress=False)

    def theirs() -> object:
        return reference(model, x, layer, units, b)

    # warm-up: every batch shape both sides use (the first pass at a shape builds kernels)
    small = x[: min(len(x), 2 * b)]
    ablate(model, small, layer, units, metric="logit", batch_size=b, progress=False)
    reference(model, small, layer, units[:1], b)
    times: dict[str, list[float]] = {"reference": [], "ablate": []}
    results = {}
    for rep in range(args.repeats):
        order = [("ablate", ours), ("reference", theirs)]
        for label, fn in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            results[label] = fn()
            times[label].append(time.perf_counter() - start)
    res = results["ablate"]
    classes, base, ablated = results["reference"]
    assert np.array_equal(res.classes, classes), (res.classes, classes)
    scale = max(1.0, float(np.abs(ablated).max()))
    base_diff = float(np.abs(res.baseline - base).max())
    diff = float(np.abs(res.ablated - ablated).max())
    assert base_diff <= 1e-4 * scale and diff <= 1e-4 * scale, (base_diff, diff, scale)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "layer": layer, "images": len(x), "units": len(units),
            "engine": res.settings["engine"], "copies": res.settings["copies_per_pass"],
            "ref_med": med["reference"], "ref_min": min(times["reference"]),
            "abl_med": med["ablate"], "abl_min": min(times["ablate"]),
            "ratio": med["reference"] / med["ablate"], "diff": diff / scale}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 images, 8 units, 2 repeats")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--units", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", choices=("all", "resnet18", "mobilenet"), default="all")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.units, args.repeats = 16, 8, 2
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    print(machine_text(device, f"torchvision {torchvision.__version__}"))
    print(NOISE_NOTE)
    print(f"{args.images} images at 224 px, the first {args.units} units, batch size "
          f"{args.batch_size}, {args.repeats} alternating repeats; metric=logit, mode=zero")
    cases = []
    if args.case in ("all", "resnet18"):
        torch.manual_seed(0)
        r18 = torchvision.models.resnet18().to(device)
        x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        cases.append(run_case("resnet18 (random init)", r18, x.to(device), "layer3", args))
    if args.case in ("all", "mobilenet"):
        mnv2, transform = load_model("mobilenet_v2-imagenet")
        mnv2 = mnv2.to(device)
        x = photos(args.images, transform).to(device)
        cases.append(run_case("mobilenet_v2 (ImageNet)", mnv2, x, "features.13", args))
    print(f"\n{'case':<24} {'layer':<12} {'N':>4} {'U':>3} {'engine':>7} {'k':>3} "
          f"{'loop med/min s':>15} {'ablate med/min s':>17} {'ratio':>6}  target")
    for c in cases:
        verdict = "ok" if c["ratio"] >= TARGET else "BELOW"
        print(f"{c['case']:<24} {c['layer']:<12} {c['images']:>4} {c['units']:>3} "
              f"{c['engine']:>7} {c['copies']:>3} {c['ref_med']:>7.2f}/{c['ref_min']:<7.2f} "
              f"{c['abl_med']:>8.2f}/{c['abl_min']:<8.2f} {c['ratio']:>6.2f}  >= {TARGET} "
              f"{verdict}")
    print("ratio = median(loop of full forward passes with a hook) / median(ablate); equal "
          "results asserted (max relative difference: "
          + ", ".join(f"{c['diff']:.1e}" for c in cases) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
