"""``dissect demo``: the toolkit on the real ImageNet MobileNetV2, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ._common import add_common, out

HELP = "run the toolkit on the real ImageNet MobileNetV2"
DEMO_LAYERS = ["features.3", "features.6", "features.13", "features.17"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("demo", help=HELP, description=HELP)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    p.add_argument("--fast", action="store_true", help="a smaller run (used by the tests)")
    add_common(p, batch=16)
    return p


def run(args: argparse.Namespace) -> int:
    """Capture four layers of the real MobileNetV2 over the bundled photographs."""
    from ..datasets import SampleImages
    from ..hooks import capture
    from ..models import imagenet_categories, load_model

    model, transform = load_model("mobilenet_v2-imagenet")
    data = SampleImages(transform)
    args.out.mkdir(parents=True, exist_ok=True)
    store = capture(
        model, data, DEMO_LAYERS, args.out / "activations.h5", batch_size=args.batch_size,
        device=args.device, num_workers=args.num_workers, progress=not args.quiet,
        overwrite=True, grads_for=None,
    )
    dev = next(model.parameters()).device
    x = torch.stack([data[i]["image"] for i in range(len(data))]).to(dev)
    with torch.inference_mode():
        probs = model(x).softmax(1).cpu()
    cats = imagenet_categories()
    out("MobileNetV2 (real ImageNet weights) on the bundled photographs:")
    for name, p in zip(data.names, probs, strict=True):
        out(f"  {name:<10} -> {cats[int(p.argmax())]} ({float(p.max()):.2f})")
    out("captured layers (rows, channels, height, width):")
    for layer in store.layers:
        maxima = store.maxima(layer)
        top = int(maxima.mean(0).argmax())
        out(f"  {layer:<12} {store[layer].shape}  most active unit: {top}")
    out(f"activations written to {store.path.resolve()}")
    return 0
