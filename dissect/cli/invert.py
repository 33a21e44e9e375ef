"""``dissect invert``: reconstruct images from a layer's representation (PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ._common import (
    add_common,
    add_model_args,
    add_tokens,
    check_out_folder,
    load_cli_model,
    make_out_folder,
    non_negative_float,
    out,
    path,
    positive,
    positive_float,
    seed,
    side,
)

HELP = "feature inversion: reconstruct an image from one layer's activations (PNG)"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("invert", help=HELP, description=HELP)
    add_model_args(p)
    p.add_argument("--layer", required=True, help="layer name (see `dissect layers MODEL`)")
    p.add_argument("--image", required=True, nargs="+", type=path, help="image file(s)")
    p.add_argument("--out", required=True, type=path,
                   help="output folder: <image>_<layer>.png and <image>_<layer>_pair.png")
    p.add_argument("--size", type=side, default=None,
                   help="resize the shorter side and centre-crop to this square (default: the "
                        "model's own resize and crop, e.g. 256 -> 224)")
    p.add_argument("--steps", type=positive, default=200, help="optimization steps (200)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="Adam learning rate (0.05)")
    p.add_argument("--tv-weight", type=non_negative_float, default=0.5,
                   help="weight of the total-variation prior (0.5)")
    p.add_argument("--param", default="fft", choices=["fft", "pixel"],
                   help="image parametrization (fft)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (0)")
    add_tokens(p)
    add_common(p, batch=16, workers=False)
    return p


def _load(file: Path, transform, size: int | None) -> torch.Tensor:
    """One image as (3, H, W) in [0, 1], resized and cropped like the model's inputs."""
    import torchvision.transforms.functional as TF

    from ..datasets import read_image

    x = torch.from_numpy(read_image(file)).permute(2, 0, 1).float() / 255.0
    if size is not None:
        return TF.center_crop(TF.resize(x, [size], antialias=True), [size, size])
    resize, crop = getattr(transform, "resize_size", None), getattr(transform, "crop_size", None)
    if resize is not None:
        x = TF.resize(x, [resize], antialias=True)
    if crop is not None:
        x = TF.center_crop(x, [crop, crop])
    return x.clamp(0, 1)


def run(args: argparse.Namespace) -> int:
    """Invert each image's representation at one layer; write the reconstruction and a pair."""
    from .. import actmax
    from .._plumbing.device import resolve_device
    from ..errors import DataError
    from ..hooks import resolve_layers

    check_out_folder(args.out)
    model, transform = load_cli_model(args)
    (layer,) = resolve_layers(model, args.layer)
    for file in args.image:
        if file.is_dir():
            raise DataError(f"--image {file} is a folder: give image files")
        if not file.is_file():
            raise DataError(f"image {file} does not exist")
    dev = resolve_device(args.device)
    normalize = getattr(transform, "normalize", transform)
    images = [_load(file, transform, args.size) for file in args.image]
    same = len({tuple(x.shape) for x in images}) == 1
    groups = [torch.stack(images)] if same else [x[None] for x in images]
    results = [actmax.invert(model, xs, layer, steps=args.steps, lr=args.lr,
                             tv_weight=args.tv_weight, param=args.param, batch_size=args.batch_size,
                             seed=args.seed, device=dev, progress=not args.quiet,
                             normalize=normalize, tokens=args.tokens) for xs in groups]
    recon = [r for batch in results for r in batch]
    make_out_folder(args.out)
    for file, x, r in zip(args.image, images, recon, strict=True):
        stem = args.out / f"{file.stem}_{layer}"
        actmax.save_grid(r[None], stem.with_name(stem.name + ".png"), pad=0)
        pair = stem.with_name(stem.name + "_pair.png")
        actmax.save_grid(torch.stack([x, r]), pair, ncol=2, labels=["input", f"from {layer}"])
        out(f"{file.name}: {layer} -> {pair}")
    out(f"wrote {len(recon)} reconstructions from {layer} to {args.out}")
    return 0
