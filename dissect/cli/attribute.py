"""``dissect attribute``: attribution maps of images as PNG overlays and .npy arrays.

The maps go to ``OUT/attribution/`` with ``OUT/attribution/attribution.json``, the file
``dissect report OUT`` reads (the format :func:`dissect.demo.run_demo` writes: one entry per
image and class, its input picture and one overlay per method). A run into a folder that holds
entries already adds to them: a map of the same image, class and method is replaced, the rest
are kept, so several runs (methods, images, or a demo) combine into one report.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ._common import (
    add_common,
    add_model_args,
    check_out_folder,
    finite_float,
    load_cli_model,
    make_out_folder,
    non_negative,
    non_negative_float,
    nonempty,
    out,
    path,
    positive,
)

log = logging.getLogger("dissect")

HELP = "attribution maps of images as PNG overlays (and .npy)"
DESCRIPTION = (
    "Attribution maps of images as PNG overlays and .npy arrays, written to OUT/attribution/ "
    "and listed in OUT/attribution/attribution.json, which `dissect report OUT` renders. "
    "Several runs into one OUT (other methods, other images, or next to `dissect netdissect` "
    "and `dissect probe` results) combine: each adds its maps to the entries already there.")

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
METHOD_LABELS = {  # dissect.attribution function name -> the name in attribution.json
    "saliency": "saliency",
    "grad_x_input": "gradient x input",
    "smoothgrad": "smoothgrad",
    "integrated_gradients": "integrated gradients",
    "occlusion": "occlusion",
    "grad_cam": "grad-cam",
}


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("attribute", help=HELP, description=DESCRIPTION)
    add_model_args(p)
    p.add_argument("--image", required=True, type=nonempty,
                   help="an image file, a folder of images (recursive) or samples")
    p.add_argument("--method", default="ig", choices=list(ATTRIBUTION_METHODS),
                   help="attribution method (ig = integrated_gradients, gradcam = grad_cam)")
    p.add_argument("--target", type=non_negative, default=None,
                   help="class index to explain (default: each image's top-1 class)")
    p.add_argument("--out", required=True, type=path,
                   help="results folder: maps go to OUT/attribution/, added to any there")
    p.add_argument("--layer", default=None,
                   help="Grad-CAM layer (default: the last layer with spatial maps)")
    p.add_argument("--steps", type=positive, default=50, help="Integrated Gradients steps (50)")
    p.add_argument("--ig-method", default="gausslegendre",
                   choices=["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                            "riemann_trapezoid"], help="IG integration rule (gausslegendre)")
    p.add_argument("--baseline", type=finite_float, default=0.0,
                   help="IG/occlusion baseline value in model-input space (0.0)")
    p.add_argument("--samples", type=positive, default=50, help="SmoothGrad noisy samples (50)")
    p.add_argument("--sigma", type=non_negative_float, default=0.15,
                   help="SmoothGrad noise, fraction of each image's value range (0.15)")
    p.add_argument("--window", type=positive, default=16,
                   help="occlusion patch side in pixels (16)")
    p.add_argument("--stride", type=positive, default=8, help="occlusion stride in pixels (8)")
    p.add_argument("--colormap", type=_colormap, default="jet",
                   help="OpenCV colormap: jet, inferno, turbo...")
    add_common(p, batch=32)
    return p


def _colormap(text: str) -> str:
    from ..attribution import colormap_code
    from ..errors import DissectError

    try:
        colormap_code(text)
    except DissectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _attribution_images(spec: str, transform) -> Sequence[dict] | torch.utils.data.Dataset:
    from ..datasets import open_dataset, read_image

    file = Path(spec)
    if file.is_file():  # one file, given to the transform like dataset images: (3, H, W) in [0, 1]
        image = torch.from_numpy(read_image(file)).permute(2, 0, 1).float() / 255.0
        return [{"image": transform(image), "name": file.name}]
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
    from .._plumbing.result_files import write_json
    from ..errors import DissectError
    from ..models import Preprocess, imagenet_categories

    check_out_folder(args.out)
    model, transform = load_cli_model(args)
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
    folder = make_out_folder(args.out / "attribution")
    index = folder / "attribution.json"
    entries = _read_entries(index)
    label_of = METHOD_LABELS[method]
    layer = args.layer
    written = 0
    for x, names in loader:
        x = x.to(dev)
        with torch.inference_mode():
            logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise DissectError(
                f"{args.model} is not a classifier: attribution explains a class score, and "
                f"its output is {shape}, not (batch, classes)")
        probs = logits.softmax(1)
        if args.target is not None and args.target >= probs.shape[1]:
            raise DissectError(f"--target {args.target} is not an output of {args.model}: it "
                               f"has {probs.shape[1]} (0 to {probs.shape[1] - 1})")
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
            png = folder / f"{stem}_{args.method}.png"
            npy = folder / f"{stem}_{args.method}.npy"
            sign = "positive" if method == "grad_cam" else "absolute"
            attribution.save_png(folder / f"{stem}.png", picture)
            attribution.save_png(png, attribution.overlay(picture, amap, args.colormap, sign=sign))
            np.save(npy, amap.cpu().numpy())
            label = cats[t] if cats is not None else ""
            entry = _entry(entries, name, t)
            entry.update(label=label, prob=round(float(p[t]), 4),
                         image=f"attribution/{stem}.png")
            entry.setdefault("maps", {})[label_of] = f"attribution/{png.name}"
            entry.setdefault("arrays", {})[label_of] = f"attribution/{npy.name}"
            shown = f" {label}" if label else ""
            out(f"{name}: class {t}{shown} (p={float(p[t]):.2f}) -> {png}")
            written += 1
    write_json(index, entries, indent=1)
    out(f"wrote {written} {args.method} maps (.png overlay, .npy array) to {folder} and "
        f"{len(entries)} entries to {index}; `dissect report {args.out}` renders them")
    return 0


def _read_entries(index: Path) -> list[dict]:
    """The entries of an existing ``attribution.json`` (none if there is no file).

    Raises
    ------
    DissectError
        When the file is not a JSON list of entries: it is not overwritten.
    """
    import json

    from ..errors import DissectError

    if not index.exists():
        return []
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise DissectError(f"{index} is not readable JSON ({exc}): move it away to start a "
                           "new one") from exc
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and "name" in e for e in entries):
        raise DissectError(f"{index} is not a list of attribution entries: move it away to "
                           "start a new one")
    return entries


def _entry(entries: list[dict], name: str, target: int) -> dict:
    """The entry of ``name`` explained for class ``target``, added if missing."""
    for e in entries:
        if e.get("name") == name and e.get("target") == target:
            return e
    entries.append({"name": name, "target": target})
    return entries[-1]
