"""``dissect capture``: stream layer activations over a dataset to an HDF5 store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_common, add_model_args, out, split_list

HELP = "stream layer activations over a dataset to HDF5"


def _pool(text: str | None):
    if text is None or text in ("mean", "max"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--pool takes mean, max or an integer size") from None


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("capture", help=HELP, description=HELP)
    add_model_args(p)
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
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Capture activations of a model over a data source into an HDF5 store."""
    from ..datasets import open_dataset
    from ..hooks import capture
    from ..models import load_model

    model, transform = load_model(args.model, args.weights)
    data = open_dataset(args.data, transform)
    store = capture(
        model, data, split_list(args.layers), args.out,
        batch_size=args.batch_size, dtype=args.dtype, pool=args.pool,
        grads_for=args.grads_for, device=args.device, num_workers=args.num_workers,
        progress=not args.quiet, resume=not args.no_resume, overwrite=args.overwrite,
    )
    for layer in store.layers:
        out(f"{layer}: {store[layer].shape} {store[layer].dtype}")
    out(f"wrote {store.path}")
    return 0
