"""``dissect ablate``: remove units of a layer and measure each class, written where
``dissect report`` finds it (the layer page's ablation section)."""

from __future__ import annotations

import argparse

from ._common import (
    add_common,
    add_model_args,
    add_tokens,
    check_out_folder,
    load_cli_model,
    make_out_folder,
    nonempty,
    out,
    path,
    units,
)

HELP = "ablation: remove each unit of a layer (or a set) and measure every class"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "ablate", help=HELP, description=HELP + " (Bau et al., PNAS 2020). Writes "
        "OUT/ablation/<layer>.json and .csv; `dissect report OUT` shows the effect of each "
        "layer's top detectors when OUT also holds a dissection (dissect netdissect).")
    add_model_args(p)
    p.add_argument("--data", required=True, type=nonempty,
                   help="a folder of images, samples, synthetic[:N] or broden:PATH")
    p.add_argument("--layer", required=True, help="layer name (see `dissect layers MODEL`)")
    p.add_argument("--units", type=units, default=None,
                   help="units, e.g. 0-15 or 3,7 (default: every channel; with --keep or "
                        "--concept, see there)")
    p.add_argument("--metric", choices=["accuracy", "logit", "probability"],
                   default="accuracy", help="measured per class (accuracy)")
    p.add_argument("--mode", choices=["zero", "mean"], default="zero",
                   help="removed units set to 0 or to their dataset mean (zero)")
    p.add_argument("--targets", type=path, default=None, metavar="FILE.npy",
                   help="one class label per sample (.npy); default: the model's own "
                        "unablated predictions")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--keep", action="store_true",
                       help="keep only --units, remove every other unit (one row)")
    group.add_argument("--concept", default=None,
                       help="remove every detector of this concept at once, from "
                            "OUT/netdissect.json (one row)")
    p.add_argument("--out", required=True, type=path,
                   help="results folder (shared with other runs; this writes OUT/ablation/)")
    add_tokens(p)
    add_common(p, workers=False)
    return p


def run(args: argparse.Namespace) -> int:
    """Ablate, write JSON and CSV, print the summary."""
    import numpy as np

    from .._plumbing.paths import safe_name
    from ..ablation import ablate, ablate_concept
    from ..datasets import open_dataset
    from ..errors import DataError, DissectError

    check_out_folder(args.out)
    if args.keep and args.units is None:
        raise DissectError("--keep needs --units: the units to keep")
    targets = None
    if args.targets is not None:
        try:
            targets = np.load(args.targets, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"--targets {args.targets}: not a readable .npy array ({exc})") \
                from exc
    model, transform = load_cli_model(args)
    data = open_dataset(args.data, transform)
    common = dict(targets=targets, metric=args.metric, mode=args.mode,
                  batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                  tokens=args.tokens)
    if args.concept is not None:
        from ..netdissect import DissectionResult

        found = args.out / "netdissect.json"
        if not found.exists():
            raise DissectError(f"--concept needs a dissection in {found}: run `dissect "
                               f"netdissect ... --out {args.out}` first")
        result = ablate_concept(DissectionResult.from_json(found), model, data, args.concept,
                                layer=args.layer, **common)
    else:
        result = ablate(model, data, args.layer, args.units, keep=args.keep, **common)
    folder = args.out / "ablation"
    make_out_folder(folder)
    stem = safe_name(result.layer)
    if result.removal != "each":
        stem += f"-{result.removal}" + (f"-{safe_name(args.concept)}" if args.concept else "")
    saved = result.to_json(folder / f"{stem}.json")
    result.to_csv(folder / f"{stem}.csv")
    out(result.summary())
    out(f"wrote {saved}; `dissect report {args.out}` renders it")
    return 0
