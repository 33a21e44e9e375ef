"""``dissect layers``: every layer of a model with its type and output shape."""

from __future__ import annotations

import argparse

import torch

from ._common import add_common, add_model_args, load_cli_model, out, output_shapes, side

HELP = "list a model's layer names and output shapes"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("layers", help=HELP, description=HELP)
    add_model_args(p)
    p.add_argument("--input-size", type=side, default=224, help="square input side (224)")
    add_common(p, batch=None, workers=False)
    return p


def run(args: argparse.Namespace) -> int:
    """Print every layer with its type and output shape for one input."""
    from .._plumbing.device import resolve_device
    from ..errors import DissectError
    from ..hooks import layer_names
    from ..hooks.tokens import known_layouts

    model, _ = load_cli_model(args)
    dev = resolve_device(args.device)
    model.to(dev)
    names = layer_names(model)
    if not names:
        raise DissectError(f"{args.model} has no layers (submodules) to list")
    modules = dict(model.named_modules())
    x = torch.zeros(1, 3, args.input_size, args.input_size, device=dev)
    layouts = known_layouts(model, names)  # token layers shown as the maps analyses read
    shapes = output_shapes(model, names, x, "--input-size", who=args.model, tokens=layouts)
    width = max(len(n) for n in names)
    for name in names:
        shape = shapes.get(name)
        shown = "x".join(str(s) for s in shape[1:]) if shape else "(not run)"
        grid = layouts[name]
        if shape and grid is not None:
            shown += " (channels-last map)" if grid.channels_last else \
                f" (tokens: {grid.prefix} prefix + {shape[2]}x{shape[3]} patches)"
        out(f"{name:<{width}}  {type(modules[name]).__name__:<22} {shown}")
    return 0
