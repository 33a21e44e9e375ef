"""``dissect deconv``: Zeiler & Fergus top-k patches and deconvnet projections as PNG grids."""

from __future__ import annotations

import argparse

from ._common import (
    add_common,
    add_k,
    add_model_args,
    add_tokens,
    check_out_folder,
    load_cli_model,
    make_out_folder,
    nonempty,
    out,
    path,
    positive,
    units,
)

HELP = "deconvnet / guided backprop top-k patches of units, as PNG grids (Zeiler & Fergus)"
MIN_TILE, MAX_TILE = 4, 1024  # a grid of 1024-pixel tiles is already hundreds of megapixels


def _tile(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not MIN_TILE <= value <= MAX_TILE:
        raise argparse.ArgumentTypeError(
            f"expected a tile side in pixels from {MIN_TILE} to {MAX_TILE}, got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("deconv", help=HELP, description=HELP)
    add_model_args(p)
    p.add_argument("--layer", required=True, help="layer name (see `dissect layers MODEL`)")
    p.add_argument("--units", required=True, type=units, help="units, e.g. 0-15 or 3,7,9")
    p.add_argument("--data", required=True, type=nonempty,
                   help="synthetic[:N], samples, broden:PATH or a folder of images")
    p.add_argument("--out", required=True, type=path, help="output folder")
    add_k(p, 9, "top images per unit")
    p.add_argument("--method", default="deconvnet", choices=["deconvnet", "guided", "gradient"],
                   help="projection method (deconvnet)")
    p.add_argument("--store", type=path, default=None,
                   help="activation store of this model over the same data (from `dissect "
                        "capture`) holding the layer: its maxima pick the top images")
    p.add_argument("--tile", type=_tile, default=None,
                   help="tile side in the grid, pixels (default: the patch size, 48 to 128)")
    p.add_argument("--columns", type=positive, default=4, help="unit blocks per grid row (4)")
    p.add_argument("--no-crop", action="store_true",
                   help="project on whole images instead of receptive-field crops (slower)")
    add_tokens(p)
    add_common(p, batch=32)
    return p


def run(args: argparse.Namespace) -> int:
    """Top-k patches of the units: a grid PNG, one PNG per unit, CSV and JSON metadata."""
    from ..datasets import open_dataset
    from ..deconvnet import save_patch_grid, save_unit_grids, top_patches
    from ..store import ActivationStore

    check_out_folder(args.out)
    model, transform = load_cli_model(args)
    data = open_dataset(args.data, transform)
    store = ActivationStore(args.store) if args.store is not None else None
    try:
        result = top_patches(model, data, args.layer, args.units, k=args.k, store=store,
                             method=args.method, batch_size=args.batch_size,
                             crop=not args.no_crop, device=args.device,
                             num_workers=args.num_workers, progress=not args.quiet,
                             tokens=args.tokens)
    finally:
        if store is not None:
            store.close()
    make_out_folder(args.out)
    stem = f"{result.layer}_{args.method}"
    grid = save_patch_grid(result, args.out / f"{stem}_grid.png", denormalize=transform,
                           tile=args.tile, columns=args.columns)
    per_unit = save_unit_grids(result, args.out, denormalize=transform, tile=args.tile)
    result.to_csv(args.out / f"{stem}_patches.csv")
    result.to_json(args.out / f"{stem}_patches.json")
    out(result.summary())
    out(f"wrote {grid}, {len(per_unit)} unit images in {args.out / result.layer}, and "
        f"{stem}_patches.csv/.json")
    return 0
