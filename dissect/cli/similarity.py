"""``dissect similarity``: layer-by-layer CKA, intrinsic dimension, an embedding and nearest
examples from captured stores, written where ``dissect report`` finds them."""

from __future__ import annotations

import argparse

from ._common import (
    add_common,
    check_out_folder,
    make_out_folder,
    names,
    out,
    path,
    positive,
    seed,
)

HELP = "layer similarity (CKA) and geometry (intrinsic dimension, PCA, nearest examples)"

def _pool(text: str) -> str | None:
    if text in ("mean", "flatten"):
        return text
    if text == "none":
        return None
    raise argparse.ArgumentTypeError("--pool takes mean, flatten or none")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "similarity", help=HELP, description=HELP + ". Writes OUT/layers/: similarity.json/"
        ".csv/.png, intrinsic_dimension.json/.png, relative_contrast.json/.png, "
        "embedding.json/.png and nearest.json (with thumbnails when the store records its "
        "dataset); `dissect report OUT` renders them on a Layers page.")
    p.add_argument("store", type=path, help="an activation store (HDF5) made by dissect capture")
    p.add_argument("--other", type=path, default=None,
                   help="a second store over the same images (another model): CKA between "
                        "the two stores' layers")
    p.add_argument("--out", type=path, default=None,
                   help="results folder (shared with other runs; this writes OUT/layers/); "
                        "default: the folder holding STORE")
    p.add_argument("--layers", type=names, default=None, help="comma-separated layers (all)")
    p.add_argument("--other-layers", type=names, default=None,
                   help="layers of --other (all)")
    p.add_argument("--pool", type=_pool, default="mean",
                   help="how spatial maps become vectors: mean, flatten or none (mean)")
    p.add_argument("--debiased", action="store_true",
                   help="debiased CKA (unbiased HSIC): near 0 for unrelated layers")
    p.add_argument("--max-dim", type=positive, default=8192,
                   help="wider layers are sketched, with a stated error bound (8192)")
    p.add_argument("--seed", type=seed, default=0, help="sketch, query and embedding seed (0)")
    p.add_argument("--no-geometry", action="store_true",
                   help="CKA only: skip intrinsic dimension, embedding and nearest examples")
    add_common(p, batch=1024, workers=False)
    return p


def run(args: argparse.Namespace) -> int:
    """Compute CKA (and the geometry), write the results and figures, print the summary."""
    from ..geometry import write_layer_results
    from ..store import ActivationStore

    if args.out is None:
        args.out = args.store.resolve().parent
    check_out_folder(args.out)
    make_out_folder(args.out)
    with ActivationStore(args.store) as store:
        other = ActivationStore(args.other) if args.other is not None else None
        try:
            results = write_layer_results(
                store, args.out, args.layers, other=other, other_layers=args.other_layers,
                pool=args.pool, debiased=args.debiased, max_dim=args.max_dim,
                geometry=not args.no_geometry, batch_size=args.batch_size, seed=args.seed,
                device=args.device, progress=not args.quiet)
        finally:
            if other is not None:
                other.close()
    out(results.summary())
    out("wrote " + ", ".join(str(p) for p in results.paths)
        + f"; `dissect report {args.out}` renders them")
    return 0
