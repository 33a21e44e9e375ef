"""Feature visualization of the real ImageNet MobileNetV2: a unit grid for four layers.

Olah et al. (Distill 2017) style: for the first units of four layers from early to late, the
image each unit's mean activation is highest for, optimized in the decorrelated 1/f Fourier
basis under Lucid's standard transforms. All units of all four layers are optimized in one
batched ``dissect.actmax.visualize`` call (the forward pass stops after the deepest layer).
Writes one PNG per unit (``OUT/<layer>/unit_<k>.png``, what layer reports embed) and one grid
with a row per layer (``OUT/feature_visualization.png``)::

    python scripts/feature_visualization.py --out featvis                 # ~4 min on 2 CPUs
    python scripts/feature_visualization.py --units 16 --steps 512 --device cuda

Early layers show colours and edges, middle layers textures and patterns, late layers parts
of objects.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dissect.actmax import channel, save_grid, save_unit_images, visualize
from dissect.errors import DissectError
from dissect.models import load_model

LAYERS = ["features.3", "features.6", "features.10", "features.14"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=",".join(LAYERS),
                   help=f"comma-separated layers ({','.join(LAYERS)})")
    p.add_argument("--units", type=int, default=8, help="first N units of each layer (8)")
    p.add_argument("--size", type=int, default=128, help="image side (128)")
    p.add_argument("--steps", type=int, default=256, help="optimization steps (256)")
    p.add_argument("--param", default="fft", choices=["fft", "pixel"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="images per forward (all)")
    p.add_argument("--out", type=Path, default=Path("featvis-out"))
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    try:
        model, transform = load_model("mobilenet_v2-imagenet")
        objectives = [channel(layer, u) for layer in layers for u in range(args.units)]
        images = visualize(model, objectives, size=args.size, steps=args.steps,
                           param=args.param, seed=args.seed, batch_size=args.batch,
                           device=args.device, progress=not args.quiet, normalize=transform)
    except DissectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for i, layer in enumerate(layers):
        rows = images[i * args.units:(i + 1) * args.units]
        save_unit_images(rows, args.out, layer, range(args.units))
    grid = save_grid(images, args.out / "feature_visualization.png", ncol=args.units,
                     labels=[o.name for o in objectives])
    print(f"{len(objectives)} units of {', '.join(layers)} -> {args.out}/<layer>/ and {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
