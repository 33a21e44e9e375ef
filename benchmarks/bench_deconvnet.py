"""Benchmark ``dissect.deconvnet.top_patches`` against a loop of captum ``Deconvolution`` calls.

What it measures
----------------
Zeiler & Fergus's top-9 projections for 64 units of a layer of the real ImageNet MobileNetV2
(``load_model("mobilenet_v2-imagenet")``, default layer ``features.7``: 64 units, receptive
field 75 px, stride 16). The images are ``--images`` (64) views of the bundled photographs
(``SampleImages``; each photo resized to 256 px, then deterministic 224 px crops and flips),
held in memory. Each unit's top-9 images come from an activation store captured beforehand
(untimed), so both implementations get the same inputs and units:

- **dissect**: ``top_patches(model, data, layer, units, k=9, store=store)``: one forward
  pass of the chosen images (no graph) to find each maximum, the receptive field, then one
  forward + one backward pass per batch of (unit, image) pairs, each on the smallest
  stride-aligned crop that holds the receptive field (``crop=True``, the default).
  With ``--full``, ``crop=False`` (the whole image for every pair) is timed too, to show
  what the crops buy (the shared forward pass alone buys little here: every unit has its
  own 9 images).
- **captum**: for each unit, ``Deconvolution(UnitMax(model, layer, unit)).attribute(x9)`` on
  its 9 images, where ``UnitMax`` runs the model up to the layer (it stops there, like ours)
  and returns ``v * v.detach()`` with ``v`` the unit's maximum, so that the gradient reaching
  the layer is the deconvnet top signal (the maximum's value at its arg-max, zero elsewhere).

Both run on a copy of the model whose ``ReLU6`` modules are replaced by ``nn.ReLU``: captum's
``Deconvolution`` overrides ``nn.ReLU`` modules only, so on the real MobileNetV2 it would
silently compute plain gradients through ReLU6 (ours reroutes ReLU6 too). On this pure
``nn.ReLU`` model the two must agree: the table prints the max absolute difference between
captum's projection cut to our patch window and ours (and captum's mass outside the window,
which must be zero: the receptive field is exact).

The implementations alternate (order flipped every repeat) after an untimed warm-up; the
table gives medians (and minima) of wall time and the ratio captum / dissect (target >= 3).
Timings are printed, never asserted. This machine may be shared: the load average is shown.

How to run
----------
::

    .venv/bin/python benchmarks/bench_deconvnet.py              # 3+ minutes on 2 idle CPUs
    .venv/bin/python benchmarks/bench_deconvnet.py --quick      # smoke check (under a minute)
    .venv/bin/python benchmarks/bench_deconvnet.py --layer features.10 --threads 1

captum comes with the ``bench`` (and ``test``) extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (
    load_text,  # noqa: E402
    version_of,
)
from _common import machine_text as common_machine_text

from dissect.datasets import SampleImages  # noqa: E402
from dissect.deconvnet import receptive_field, top_patches  # noqa: E402
from dissect.hooks import StopForward, capture  # noqa: E402
from dissect.models import load_model  # noqa: E402

TARGET = 3.0


class UnitMax(nn.Module):
    """``model`` cut at ``layer``: one unit's maximum ``v`` per input, returned as ``v * v``.

    The gradient of ``v * v.detach()`` with respect to the layer output is ``v`` at the
    arg-max and zero elsewhere: the deconvnet top signal of ``location="max"``.
    """

    def __init__(self, model: nn.Module, layer: str, unit: int) -> None:
        super().__init__()
        self.model, self.layer, self.unit = model, layer, unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grab: dict[str, torch.Tensor] = {}

        def hook(module, inputs, output):
            grab["out"] = output
            raise StopForward()

        handle = self.model.get_submodule(self.layer).register_forward_hook(hook)
        try:
            self.model(x)
        except StopForward:
            pass
        finally:
            handle.remove()
        v = grab["out"][:, self.unit].flatten(1).max(dim=1).values
        return v * v.detach()


def relu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``ReLU6`` replaced by a (not in-place) ``nn.ReLU``."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, nn.ReLU())
    return model


class Views(torch.utils.data.Dataset):
    """``n`` 224 px views of the bundled photographs, preprocessed and held in memory."""

    def __init__(self, n: int, transform) -> None:
        photos = SampleImages()
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            image = photos[i % len(photos)]["image"]
            image = TF.resize(image, [256], antialias=True)
            h, w = image.shape[1:]
            top = int(torch.randint(0, h - 224 + 1, (1,), generator=g))
            left = int(torch.randint(0, w - 224 + 1, (1,), generator=g))
            image = image[:, top:top + 224, left:left + 224]
            if (i // len(photos)) % 2:
                image = image.flip(-1)
            self.items.append({"image": transform.normalize(image), "index": i})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def machine_text(device: torch.device) -> str:
    return common_machine_text(device, f"captum {version_of('captum')}")


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def captum_loop(model: nn.Module, data: Views, layer: str, units: list[int],
                rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """For each unit, one captum Deconvolution call on its top images: ``(k, C, H, W)``."""
    from captum.attr import Deconvolution

    out = []
    for unit, unit_rows in zip(units, rows, strict=True):
        x = torch.stack([data[r]["image"] for r in unit_rows]).to(device)
        attr = Deconvolution(UnitMax(model, layer, unit)).attribute(x)
        out.append(attr.detach().cpu())
    return out


def agreement(top, theirs: list[torch.Tensor]) -> tuple[float, float, float]:
    """Max |ours - captum| on the windows, captum's max |.|, and its max |.| outside them."""
    diff, scale, outside = 0.0, 0.0, 0.0
    for n, unit_patches in enumerate(top.patches):
        for p in unit_patches:
            full = theirs[n][p.rank]
            y0, y1, x0, x1 = p.window
            diff = max(diff, float((full[:, y0:y1, x0:x1] - top.projections[n, p.rank]).abs()
                                   .max()))
            scale = max(scale, float(full.abs().max()))
            rest = full.clone()
            rest[:, y0:y1, x0:x1] = 0
            outside = max(outside, float(rest.abs().max()))
    return diff, scale, outside


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 8 units, 24 images, 1 repeat")
    p.add_argument("--layer", default="features.7", help="MobileNetV2 layer (features.7)")
    p.add_argument("--units", type=int, default=64, help="units 0..N-1 of the layer (64)")
    p.add_argument("--k", type=int, default=9, help="top images per unit (9)")
    p.add_argument("--images", type=int, default=64, help="images to choose from (64)")
    p.add_argument("--batch-size", type=int, default=64, help="dissect's batch size (64)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed repeats (3)")
    p.add_argument("--full", action="store_true",
                   help="also time dissect with crop=False (whole images; as slow as captum)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.quick:
        args.units, args.images = 8, 24
        args.repeats = 1 if args.repeats == p.get_default("repeats") else args.repeats
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import captum  # noqa: F401
    except ImportError:
        print("captum is not installed: pip install -e '.[bench]' to compare; nothing to do")
        return 0
    device = torch.device(args.device)
    print(machine_text(device), flush=True)
    real, transform = load_model("mobilenet_v2-imagenet")
    model = relu_copy(real).to(device).eval()
    data = Views(args.images, transform)
    units = list(range(args.units))
    field = receptive_field(model, args.layer, (3, 224, 224), device=device)
    print(f"MobileNetV2 (ImageNet, ReLU6 -> nn.ReLU copy), layer {args.layer}: {field}")
    print(f"{args.units} units, top-{args.k} of {args.images} images of 224 px", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        store = capture(model, data, [args.layer], Path(tmp) / "acts.h5", pool="max",
                        batch_size=args.batch_size, device=device, progress=False)
        ours = {
            "dissect": lambda: top_patches(model, data, args.layer, units, k=args.k,
                                           store=store, batch_size=args.batch_size,
                                           device=device, progress=False),
        }
        if args.full:
            ours["dissect crop=False"] = lambda: top_patches(
                model, data, args.layer, units, k=args.k, store=store, crop=False,
                batch_size=args.batch_size, device=device, progress=False)
        first = ours["dissect"]()
        rows = [[p.row for p in unit_patches] for unit_patches in first.patches]
        chosen = len({r for unit_rows in rows for r in unit_rows})
        print(f"top images: {chosen} distinct images in {sum(map(len, rows))} (unit, image) "
              "pairs", flush=True)
        calls = {**ours, "captum": lambda: captum_loop(model, data, args.layer, units, rows,
                                                       device)}
        # warm-up: first-call costs (lazy imports, kernel set-up at each shape) of each
        for name, fn in calls.items():
            if name != "dissect":
                small = {"captum": lambda: captum_loop(model, data, args.layer, units[:1],
                                                       rows[:1], device)}
                small.get(name, fn)()
        times: dict[str, list[float]] = {name: [] for name in calls}
        results: dict[str, object] = {}
        for r in range(args.repeats):
            order = list(calls) if r % 2 == 0 else list(calls)[::-1]
            for name in order:
                wall, out = timed(calls[name], device)
                times[name].append(wall)
                results[name] = out
                print(f"    repeat {r + 1}/{args.repeats} {name:<20} {wall:7.2f} s  "
                      f"({load_text()})", flush=True)
        store.close()

    diff, scale, outside = agreement(results["dissect"], results["captum"])
    captum_median = statistics.median(times["captum"])
    print(f"\ntop-{args.k} deconvnet projections of {args.units} units of {args.layer}, "
          f"{args.repeats} alternating repeats; ratio = captum / dissect (target >= "
          f"{TARGET:.0f}), median [min/min]")
    head = f"{'implementation':<22} {'median s':>9} {'min s':>8} {'ratio':>16}"
    print(head)
    print("-" * len(head))
    for name, values in times.items():
        med, low = statistics.median(values), min(values)
        ratio = f"{captum_median / med:.2f} [{min(times['captum']) / low:.2f}]"
        print(f"{name:<22} {med:>9.2f} {low:>8.2f} {ratio:>16}")
    print(f"max |dissect - captum| on the patch windows: {diff:.3e} (captum max |.| "
          f"{scale:.3e}, relative {diff / max(scale, 1e-30):.1e}); captum's max |.| outside "
          f"the windows: {outside:.1e}")
    print(f"after the runs: {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
