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
  dissect attribute mobilenet_v2-imagenet --image samples --method ig --out maps
  dissect attribute torchvision:resnet18 --weights r18.pth --image cat.jpg --method gradcam \
      --target 281 --out maps --device cuda
  dissect demo --out demo-out
"""

ATTRIBUTION_METHODS = {  # command-line name -> dissect.attribution function name
    "saliency": "saliency",
    "grad_x_input": "grad_x_input",
    "smoothgrad": "smoothgrad",
    "ig": "integrated_gradients",
    "integrated_gradients": "integrated_gradients",
    "occlusion": "occlusion",
    "gradcam": "grad_cam",
    "grad_cam": "grad_cam",
}

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

    p = sub.add_parser("attribute", help="attribution maps of images as PNG overlays (and .npy)")
    _model_args(p)
    p.add_argument("--image", required=True,
                   help="an image file, a folder of images (recursive) or samples")
    p.add_argument("--method", default="ig", choices=list(ATTRIBUTION_METHODS),
                   help="attribution method (ig = integrated_gradients, gradcam = grad_cam)")
    p.add_argument("--target", type=int, default=None,
                   help="class index to explain (default: each image's top-1 class)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--layer", default=None,
                   help="Grad-CAM layer (default: the last layer with spatial maps)")
    p.add_argument("--steps", type=int, default=50, help="Integrated Gradients steps (50)")
    p.add_argument("--ig-method", default="gausslegendre",
                   choices=["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                            "riemann_trapezoid"], help="IG integration rule (gausslegendre)")
    p.add_argument("--baseline", type=float, default=0.0,
                   help="IG/occlusion baseline value in model-input space (0.0)")
    p.add_argument("--samples", type=int, default=50, help="SmoothGrad noisy samples (50)")
    p.add_argument("--sigma", type=float, default=0.15,
                   help="SmoothGrad noise, fraction of each image's value range (0.15)")
    p.add_argument("--window", type=int, default=16, help="occlusion patch side in pixels (16)")
    p.add_argument("--stride", type=int, default=8, help="occlusion stride in pixels (8)")
    p.add_argument("--colormap", default="jet", help="OpenCV colormap: jet, inferno, turbo...")
    _common(p, batch=32)
    p.set_defaults(func=cmd_attribute)

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


def _attribution_images(spec: str, transform) -> Sequence[dict] | torch.utils.data.Dataset:
    from .datasets import open_dataset, read_image

    path = Path(spec)
    if path.is_file():  # one file, given to the transform like dataset images: (3, H, W) in [0, 1]
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).float() / 255.0
        return [{"image": transform(image), "name": path.name}]
    return open_dataset(spec, transform)


def _collate_images(items: list[dict]) -> tuple[torch.Tensor, list[str]]:
    names = [str(it.get("name", f"image{it.get('index', '')}")) for it in items]
    return torch.stack([it["image"] for it in items]), names


def cmd_attribute(args: argparse.Namespace) -> int:
    """Attribution maps of one image or a folder: PNG overlays and .npy arrays."""
    import numpy as np
    from torch.utils.data import DataLoader

    from . import attribution
    from ._device import resolve_device
    from .models import Preprocess, imagenet_categories, load_model

    model, transform = load_model(args.model, args.weights)
    dev = resolve_device(args.device)
    model.to(dev)
    data = _attribution_images(args.image, transform)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=_collate_images)
    method = ATTRIBUTION_METHODS[args.method]
    fn = getattr(attribution, method)
    options: dict = {"device": dev}
    if method in ("smoothgrad", "integrated_gradients", "occlusion"):
        options.update(batch_size=args.batch_size, progress=not args.quiet)
    if method == "smoothgrad":
        options.update(n=args.samples, sigma=args.sigma)
    elif method == "integrated_gradients":
        options.update(steps=args.steps, method=args.ig_method, baseline=args.baseline)
    elif method == "occlusion":
        options.update(window=args.window, stride=args.stride, baseline=args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    layer = args.layer
    written = 0
    for x, names in loader:
        x = x.to(dev)
        with torch.inference_mode():
            probs = model(x).softmax(1)
        targets = probs.argmax(1).tolist() if args.target is None else [args.target] * len(x)
        cats = imagenet_categories() if probs.shape[1] == 1000 else None
        if method == "grad_cam":
            if layer is None:
                layer = attribution.last_spatial_layer(model, x[:1], device=dev)
                log.info("Grad-CAM layer: %s (choose another with --layer)", layer)
            maps = fn(model, x, targets, layer, **options)
        else:
            maps = fn(model, x, targets, **options)
        if isinstance(transform, Preprocess):
            pictures = transform.denormalize(x).clamp(0, 1)
        else:  # an unknown preprocessing: show each input stretched to [0, 1]
            low = x.amin(dim=(1, 2, 3), keepdim=True)
            pictures = (x - low) / (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
        for name, picture, amap, t, p in zip(names, pictures, maps, targets, probs, strict=True):
            stem = Path(name).with_suffix("").as_posix().replace("/", "__")
            png = args.out / f"{stem}_{args.method}.png"
            sign = "positive" if method == "grad_cam" else "absolute"
            attribution.save_png(png, attribution.overlay(picture, amap, args.colormap, sign=sign))
            np.save(args.out / f"{stem}_{args.method}.npy", amap.cpu().numpy())
            label = f" {cats[t]}" if cats is not None else ""
            _out(f"{name}: class {t}{label} (p={float(p[t]):.2f}) -> {png}")
            written += 1
    _out(f"wrote {written} {args.method} maps (.png overlay, .npy array) to {args.out}")
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
