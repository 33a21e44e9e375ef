"""Reproduce Network Dissection's detector counts (Bau et al., CVPR 2017, Fig. 4 style).

Runs torchvision ResNet-18 or AlexNet over a Broden dataset and prints, per layer, the number
of detectors (units whose best IoU > 0.04) in each concept category, the way the paper's figure
summarizes them. Needs the real Broden (``broden1_224`` for ResNet-18, ``broden1_227`` for
AlexNet) and the model's ImageNet weights, which this script never downloads: pass a ``.pth``
file or a torchvision weights enum name present in the torch hub cache. On a GPU server::

    python scripts/reproduce_netdissect.py --broden dataset/broden1_224 --model resnet18 \\
        --weights IMAGENET1K_V1 --out r18-dissection --device cuda --batch-size 128 --workers 8

The paper reports for AlexNet conv5 (ImageNet) about 60-70 detectors of which most are
objects and textures; ResNet layers show more object detectors with depth.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

from dissect.datasets import Broden
from dissect.errors import DissectError
from dissect.hooks import capture
from dissect.models import load_model
from dissect.netdissect import dissect

LAYERS = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "alexnet": ["features.1", "features.4", "features.7", "features.9", "features.11"],
}


def detector_table(result) -> str:
    """Detectors per category per layer, one row per layer (the paper's summary)."""
    cats = result.categories
    lines = [f"{'layer':<14}" + "".join(f"{c:>10}" for c in cats) + f"{'total':>8}{'unique':>8}"]
    for layer in result.layers:
        det = result.detectors(layer)
        per = Counter(u.category for u in det)
        unique = len({u.concept for u in det})
        lines.append(f"{layer:<14}" + "".join(f"{per[c]:>10}" for c in cats)
                     + f"{len(det):>8}{unique:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broden", type=Path, default=Path("dataset/broden1_224"))
    p.add_argument("--model", choices=sorted(LAYERS), default="resnet18")
    p.add_argument("--weights", default=None, help=".pth or a weights enum in the hub cache")
    p.add_argument("--layers", default=None, help="comma-separated (default: the model's usual)")
    p.add_argument("--out", type=Path, default=Path("netdissect-out"))
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO)
    if not (args.broden / "index.csv").is_file():
        print(f"no Broden dataset at {args.broden} (index.csv missing): download broden1_224 "
              "from the NetDissect project on a machine with internet", file=sys.stderr)
        return 2
    if args.weights is None:
        print("warning: no --weights: a randomly initialised network has few detectors",
              file=sys.stderr)
    try:
        model, transform = load_model(f"torchvision:{args.model}", args.weights)
        data = Broden(args.broden)
        data.transform = transform.without_resize()
        layers = args.layers.split(",") if args.layers else LAYERS[args.model]
        args.out.mkdir(parents=True, exist_ok=True)
        store = capture(model, data, layers, args.out / "activations.h5",
                        batch_size=args.batch_size, device=args.device,
                        num_workers=args.workers, progress=not args.quiet)
        result = dissect(store, data, layers, batch_size=args.batch_size, device=args.device,
                         num_workers=args.workers, progress=not args.quiet)
    except DissectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result.to_csv(args.out)
    result.to_json(args.out / "netdissect.json")
    print(f"{args.model} on {args.broden} ({len(data)} images)")
    print(detector_table(result))
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
