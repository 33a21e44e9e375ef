"""``dissect attribute``: attribution maps of images as PNG overlays and .npy arrays."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ._common import add_common, add_model_args, out

log = logging.getLogger("dissect")

HELP = "attribution maps of images as PNG overlays (and .npy)"

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


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("attribute", help=HELP, description=HELP)
    add_model_args(p)
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
    add_common(p, batch=32)
    return p



def _attribution_images(spec: str, transform) -> Sequence[dict] | torch.utils.data.Dataset:
    from ..datasets import open_dataset, read_image

    path = Path(spec)
    if path.is_file():  # one file, given to the transform like dataset images: (3, H, W) in [0, 1]
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).float() / 255.0
        return [{"image": transform(image), "name": path.name}]
    return open_dataset(spec, transform)


def _collate_images(items: list[dict]) -> tuple[torch.Tensor, list[str]]:
    names = [str(it.get("name", f"image{it.get('index', '')}")) for it in items]
    return torch.stack([it["image"] for it in items]), names


def run(args: argparse.Namespace) -> int:
    """Attribution maps of one image or a folder: PNG overlays and .npy arrays."""
    import numpy as np
    from torch.utils.data import DataLoader

    from .. import attribution
    from .._plumbing.device import resolve_device
    from ..models import Preprocess, imagenet_categories, load_model

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
            out(f"{name}: class {t}{label} (p={float(p[t]):.2f}) -> {png}")
            written += 1
    out(f"wrote {written} {args.method} maps (.png overlay, .npy array) to {args.out}")
    return 0
