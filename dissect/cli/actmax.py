"""``dissect actmax``: feature visualizations of a layer's units as PNGs (one per unit + grid)."""

from __future__ import annotations

import argparse

import torch

from ._common import (
    add_common,
    add_model_args,
    add_tokens,
    check_out_folder,
    load_cli_model,
    make_out_folder,
    out,
    output_shapes,
    path,
    positive,
    positive_float,
    seed,
    side,
    units,
)

HELP = "activation maximization: the image each unit of a layer wants to see (PNG)"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("actmax", help=HELP, description=HELP)
    add_model_args(p)
    p.add_argument("--layer", required=True, help="layer name (see `dissect layers MODEL`)")
    p.add_argument("--units", type=units, default=None,
                   help="channels to visualize, e.g. 0-63 or 3,7,9 (default: all of the layer)")
    p.add_argument("--out", required=True, type=path,
                   help="output folder: OUT/<layer>/unit_<k>.png, OUT/<layer>_grid.png and "
                        "OUT/<layer>.json (use RESULTS/actmax for the report)")
    p.add_argument("--size", type=side, default=128, help="image side in pixels (128)")
    p.add_argument("--steps", type=positive, default=512, help="optimization steps (512)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="Adam learning rate (0.05)")
    p.add_argument("--param", default="fft", choices=["fft", "pixel"],
                   help="image parametrization (fft)")
    p.add_argument("--no-decorrelate", action="store_true",
                   help="optimize plain RGB instead of the decorrelated colour basis")
    p.add_argument("--transforms", default="standard", choices=["standard", "resized", "none"],
                   help="random transforms each step (standard: Lucid's; resized: Lucid's, "
                   "resized back to --size, for models that take one input size such as ViTs)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (0)")
    p.add_argument("--ncol", type=positive, default=8, help="grid columns (8)")
    add_tokens(p)
    add_common(p, batch=64, workers=False)
    return p


def _channels(model: torch.nn.Module, layer: str, size: int, normalize, dev, tokens) -> int:
    """Channel count of ``layer`` from one forward pass of a grey image."""
    from ..errors import DissectError

    x = normalize(torch.full((1, 3, size, size), 0.5, device=dev))
    shapes = output_shapes(model, layer, x, "--size", stop=True, tokens=tokens)
    shape = shapes.get(layer)
    if shape is None:
        raise DissectError(f"layer {layer} did not run in the model's forward pass: choose "
                           "one that does (see `dissect layers MODEL`)")
    if len(shape) < 2:
        raise DissectError(f"layer {layer} has outputs of shape {shape}, no channels: "
                           "choose a layer with (batch, channels, ...) outputs")
    return shape[1]


def run(args: argparse.Namespace) -> int:
    """Visualize units of one layer; write one PNG per unit and a grid."""
    from .. import actmax
    from .._plumbing.device import resolve_device
    from .._plumbing.paths import safe_name
    from ..hooks import resolve_layers

    check_out_folder(args.out)
    model, transform = load_cli_model(args)
    (layer,) = resolve_layers(model, args.layer)
    dev = resolve_device(args.device)
    model.to(dev)
    normalize = getattr(transform, "normalize", transform)
    chosen = args.units
    if chosen is None:
        chosen = list(range(_channels(model, layer, args.size, normalize, dev, args.tokens)))
    transforms = {"none": None, "standard": "standard",
                  "resized": actmax.standard_transforms(size=args.size)}[args.transforms]
    result = actmax.visualize(
        model, [actmax.channel(layer, u) for u in chosen], size=args.size, steps=args.steps,
        lr=args.lr, param=args.param, decorrelate=not args.no_decorrelate,
        transforms=transforms, tokens=args.tokens,
        batch_size=args.batch_size, seed=args.seed, device=dev, progress=not args.quiet,
        normalize=normalize, return_result=True,
    )
    make_out_folder(args.out)
    paths = result.save_unit_images(args.out)
    grid = result.save_grid(args.out / f"{safe_name(layer)}_grid.png", ncol=args.ncol)
    saved = result.to_json(args.out / f"{safe_name(layer)}.json")
    out(result.summary())
    out(f"wrote {len(paths)} unit images of {layer} to {args.out}, the grid {grid} and "
        f"{saved} (the report reads OUT=RESULTS/actmax)")
    return 0
