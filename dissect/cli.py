"""The ``dissect`` command: argparse subcommands that wire the library together.

No analysis logic lives here; each subcommand calls the public API.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import DissectError

log = logging.getLogger("dissect")

EPILOG = """examples:
  dissect layers mobilenet_v2-imagenet --input-size 224
  dissect capture mobilenet_v2-imagenet --data samples --layers features.6,features.13 \\
      --out acts.h5 --pool mean
  dissect capture torchvision:resnet18 --weights r18.pth --data ./images --layers layer4 \\
      --out r18.h5 --device cuda
  dissect netdissect torchvision:resnet18 --weights r18.pth --dataset broden:broden1_224 \
      --layers layer3,layer4 --out r18-dissect --device cuda
  dissect demo --out demo-out
"""

DEMO_LAYERS = ["features.3", "features.6", "features.13", "features.17"]


def _common(p: argparse.ArgumentParser, batch: int = 64) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.add_argument("--batch-size", type=int, default=batch, help=f"samples per batch ({batch})")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or info messages")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME, mobilenet_v2-imagenet or file.py:factory")
    p.add_argument("--weights", default=None, help=".pth file or torchvision weights enum name")


def _pool(text: str | None):
    if text is None or text in ("mean", "max"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--pool takes mean, max or an integer size") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``dissect`` argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="dissect",
        description="Open trained PyTorch networks layer by layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"torch-dissect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("layers", help="list a model's layer names and output shapes")
    _model_args(p)
    p.add_argument("--input-size", type=int, default=224, help="square input side (224)")
    _common(p, batch=1)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("capture", help="stream layer activations over a dataset to HDF5")
    _model_args(p)
    p.add_argument("--data", required=True,
                   help="a folder of images, samples, synthetic[:N] or broden:PATH")
    p.add_argument("--layers", required=True, help="comma-separated layer names")
    p.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--pool", type=_pool, default=None, help="mean, max or an output size")
    p.add_argument("--grads-for", type=int, default=None, metavar="CLASS",
                   help="also store gradients of this output index")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished file")
    _common(p)
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("netdissect", help="Network Dissection: label units with concepts")
    _model_args(p)
    p.add_argument("--dataset", required=True, help="broden:PATH, synthetic[:N] or a Broden folder")
    p.add_argument("--layers", required=True, help="comma-separated layer names")
    p.add_argument("--out", required=True, type=Path, help="output folder (store, CSV, JSON)")
    p.add_argument("--quantile", type=float, default=0.005, help="top activation share (0.005)")
    p.add_argument("--iou-threshold", type=float, default=0.04, help="detector IoU (0.04)")
    p.add_argument("--categories", default=None, help="comma-separated categories (all)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored activation dtype (float16)")
    _common(p)
    p.set_defaults(func=cmd_netdissect)

    p = sub.add_parser("demo", help="run the toolkit on the real ImageNet MobileNetV2")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    p.add_argument("--fast", action="store_true", help="a smaller run (used by the tests)")
    _common(p, batch=16)
    p.set_defaults(func=cmd_demo)
    return parser


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def cmd_layers(args: argparse.Namespace) -> int:
    """Print every layer with its type and output shape for one input."""
    from ._device import resolve_device
    from .hooks import Trace, layer_names
    from .models import load_model

    model, _ = load_model(args.model, args.weights)
    dev = resolve_device(args.device)
    model.to(dev)
    names = layer_names(model)
    modules = dict(model.named_modules())
    x = torch.zeros(1, 3, args.input_size, args.input_size, device=dev)
    with torch.inference_mode(), Trace(model, names, transform=lambda n, t: tuple(t.shape)) as tr:
        model(x)
    width = max(len(n) for n in names)
    for name in names:
        shape = tr.outputs.get(name)
        shown = "x".join(str(s) for s in shape[1:]) if shape else "(not run)"
        _out(f"{name:<{width}}  {type(modules[name]).__name__:<22} {shown}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    """Capture activations of a model over a data source into an HDF5 store."""
    from .datasets import open_dataset
    from .hooks import capture
    from .models import load_model

    model, transform = load_model(args.model, args.weights)
    data = open_dataset(args.data, transform)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    store = capture(
        model, data, layers, args.out,
        batch_size=args.batch_size, dtype=args.dtype, pool=args.pool,
        grads_for=args.grads_for, device=args.device, num_workers=args.num_workers,
        progress=not args.quiet, resume=not args.no_resume, overwrite=args.overwrite,
    )
    for layer in store.layers:
        _out(f"{layer}: {store[layer].shape} {store[layer].dtype}")
    _out(f"wrote {store.path}")
    return 0


def cmd_netdissect(args: argparse.Namespace) -> int:
    """Capture (or reuse) a store over a concept dataset, score it, write CSV/JSON."""
    from .datasets import open_dataset
    from .hooks import capture
    from .models import Preprocess, load_model
    from .netdissect import dissect

    model, transform = load_model(args.model, args.weights)
    data = open_dataset(args.dataset)
    # keep pixels aligned with the segmentation: normalization only, no resize or crop
    data.transform = transform.without_resize() if isinstance(transform, Preprocess) else transform
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    store = capture(model, data, layers, args.out / "activations.h5", batch_size=args.batch_size,
                    dtype=args.dtype, device=args.device, num_workers=args.num_workers,
                    progress=not args.quiet)
    categories = args.categories.split(",") if args.categories else None
    result = dissect(store, data, layers, quantile=args.quantile,
                     iou_threshold=args.iou_threshold, categories=categories,
                     batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                     num_workers=args.num_workers)
    result.to_csv(args.out)
    result.to_json(args.out / "netdissect.json")
    _out(result.summary())
    _out(f"wrote {args.out / 'netdissect.json'} and one CSV per layer in {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Capture four layers of the real MobileNetV2 over the bundled photographs."""
    from .datasets import SampleImages
    from .hooks import capture
    from .models import imagenet_categories, load_model

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
    _out("MobileNetV2 (real ImageNet weights) on the bundled photographs:")
    for name, p in zip(data.names, probs, strict=True):
        _out(f"  {name:<10} -> {cats[int(p.argmax())]} ({float(p.max()):.2f})")
    _out("captured layers (rows, channels, height, width):")
    for layer in store.layers:
        maxima = store.maxima(layer)
        top = int(maxima.mean(0).argmax())
        _out(f"  {layer:<12} {store[layer].shape}  most active unit: {top}")
    _out(f"activations written to {store.path.resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dissect`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except DissectError as exc:
        sys.stderr.write(f"dissect {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; a rerun of the same command resumes where it stopped\n")
        return 130
