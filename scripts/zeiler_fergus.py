"""Render Zeiler & Fergus's layer-by-layer figure (ECCV 2014, Fig. 2) for the real MobileNetV2.

For each of four layers of the ImageNet MobileNetV2 (``load_model("mobilenet_v2-imagenet")``),
a random subset of units (as in the paper), and for each unit its top-9 images among the
bundled real photographs (``SampleImages``, resized to 256 and centre-cropped to 224) plus a
set of synthetic concept images (``SyntheticConcepts``, drawn at 224 px): the deconvnet
projections of the unit's maximum, beside the image patches, both cut to the unit's receptive
field. The receptive fields grow with depth, so the patches do too.

One pass over the images stores every layer's per-image maxima (``capture(...,
pool="max")``); the top images are read from that store for each layer and method.

By default each layer gets two bands, deconvnet and guided backprop. MobileNetV2 has no
max-pooling, so its deconvnet projections carry no switches, and its rectifiers ignore the
forward pass: a unit's deconvnet projection depends on the image only through the position
and value of the maximum, and its 9 projections look alike (up to the image border). Guided
backprop keeps the forward ReLU masks and so shows what in each image drove the unit.

Outputs, in ``--out``::

    zeiler_fergus.png                    the layers stacked, one titled band per layer+method
    <layer>_<method>_grid.png            one grid (projections | patches, per unit)
    <method>/<layer>/unit_0012.png       one unit's block (for reports)
    <layer>_<method>_patches.csv/.json   which images, values, positions, boxes
    activations.h5                       the store of per-image maxima

Run::

    python scripts/zeiler_fergus.py --out zf-figure                    # a few minutes on a CPU
    python scripts/zeiler_fergus.py --out zf-figure --methods guided --units 16 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import ConcatDataset

from dissect.attribution import save_png
from dissect.datasets import SampleImages, SyntheticConcepts
from dissect.deconvnet import patch_grid, save_unit_grids, top_patches
from dissect.errors import DissectError
from dissect.hooks import capture
from dissect.models import load_model

LAYERS = ("features.2", "features.4", "features.7", "features.10")


def title_band(text: str, width: int) -> np.ndarray:
    """A white strip with ``text`` in black, ``width`` pixels wide."""
    band = np.full((28, width, 3), 255, dtype=np.uint8)
    cv2.putText(band, text, (12, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                cv2.LINE_AA)
    return band


def stack(panels: list[np.ndarray]) -> np.ndarray:
    """Stack images vertically, padding narrower ones with white on the right."""
    width = max(p.shape[1] for p in panels)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255)
              for p in panels]
    return np.concatenate(padded, axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("zeiler-fergus"))
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layer names")
    p.add_argument("--units", type=int, default=8, help="random units per layer (8)")
    p.add_argument("--k", type=int, default=9, help="top images per unit (9)")
    p.add_argument("--synthetic", type=int, default=64, help="synthetic images added (64)")
    p.add_argument("--methods", default="deconvnet,guided",
                   help="comma-separated: deconvnet, guided, gradient (deconvnet,guided)")
    p.add_argument("--seed", type=int, default=0, help="seed of the unit choice (0)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in pixels (default: the patch size, 48 to 128)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        model, transform = load_model("mobilenet_v2-imagenet")
        photos = SampleImages(transform)
        shapes = SyntheticConcepts(args.synthetic, size=224, transform=transform.without_resize())
        data = ConcatDataset([photos, shapes])
        print(f"{len(photos)} photographs ({', '.join(photos.names)}) + {len(shapes)} "
              f"synthetic concept images, 224 px")
        methods = [m for m in args.methods.split(",") if m]
        layers = args.layers.split(",")
        args.out.mkdir(parents=True, exist_ok=True)
        # one pass over the data stores every layer's per-image maxima: the top images of
        # every unit and method are then read from it, not recomputed
        store = capture(model, data, layers, args.out / "activations.h5", pool="max",
                        batch_size=args.batch_size, device=args.device,
                        progress=not args.quiet)
        generator = torch.Generator().manual_seed(args.seed)
        panels = []
        for layer in layers:
            count = store.maxima(layer).shape[1]
            units = sorted(torch.randperm(count, generator=generator)[: args.units].tolist())
            for method in methods:
                result = top_patches(model, data, layer, units, k=args.k, store=store,
                                     method=method, batch_size=args.batch_size,
                                     device=args.device, progress=not args.quiet)
                print(result.summary())
                grid = patch_grid(result, denormalize=transform, tile=args.tile, columns=4)
                stem = f"{layer}_{method}"
                save_png(args.out / f"{stem}_grid.png", grid)
                save_unit_grids(result, args.out / method, denormalize=transform,
                                tile=args.tile)
                result.to_csv(args.out / f"{stem}_patches.csv")
                result.to_json(args.out / f"{stem}_patches.json")
                field = result.field
                where = (f"receptive field {field.size[0]} px, stride {field.stride[0]}"
                         if not field.is_global else "global receptive field")
                panels += [title_band(f"{layer} ({where}): {method} projections | top-"
                                      f"{result.k} patches", grid.shape[1]), grid]
        store.close()
        figure = save_png(args.out / "zeiler_fergus.png", stack(panels))
    except DissectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {figure} and one grid, CSV and JSON per layer in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
