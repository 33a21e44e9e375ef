"""``dissect netdissect``: capture (or reuse) a store, score units against concepts.

Under ``torchrun --nproc_per_node=N -m dissect netdissect ...`` the capture and the scoring are
split across the ranks (:mod:`dissect.distributed`); only rank 0 writes the CSV/JSON and prints.
"""

from __future__ import annotations

import argparse
import json

from ._common import (
    add_common,
    add_k,
    add_model_args,
    add_tokens,
    check_out_folder,
    fraction,
    load_cli_model,
    make_out_folder,
    names,
    non_negative,
    nonempty,
    open_fraction,
    out,
    path,
    positive,
)
from .capture import add_dist_timeout, dist_session

HELP = "Network Dissection: label units with concepts"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("netdissect", help=HELP, description=HELP)
    add_model_args(p)
    p.add_argument("--dataset", required=True, type=nonempty,
                   help="broden:PATH, synthetic[:N] or a Broden folder")
    p.add_argument("--layers", required=True, type=names, help="comma-separated layer names")
    p.add_argument("--out", required=True, type=path, help="output folder (store, CSV, JSON)")
    p.add_argument("--quantile", type=open_fraction, default=0.005,
                   help="top activation share, between 0 and 1 (0.005)")
    p.add_argument("--iou-threshold", type=fraction, default=0.04,
                   help="detector IoU, from 0 to 1 (0.04)")
    p.add_argument("--categories", type=names, default=None,
                   help="comma-separated categories (all)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored activation dtype (float16)")
    p.add_argument("--unit-images", type=non_negative, default=64, metavar="N",
                   help="draw the top images of the N best units per layer for the report "
                        "(64; 0: none)")
    add_k(p, 5, "top images drawn per unit")
    p.add_argument("--engine", choices=["auto", "numba", "torch"], default="auto",
                   help="counting engine; all give the same counts (auto)")
    p.add_argument("--area", choices=["annotated", "lite"], default="annotated",
                   help="active-area rule: annotated (default) or NetDissect-Lite's (lite)")
    p.add_argument("--checkpoint-every", type=positive, default=50, metavar="BATCHES",
                   help="save the counts to OUT/netdissect.ckpt every BATCHES batches; a rerun "
                        "with the same arguments resumes from it (50)")
    p.add_argument("--restart", action="store_true",
                   help="ignore a checkpoint left in OUT by an earlier run and start over")
    p.add_argument("--annotation-cache", type=path, default=None, metavar="DIR",
                   help="cache decoded label planes in DIR (default: $DISSECT_CACHE_DIR, else "
                        "~/.cache/torch-dissect)")
    p.add_argument("--no-annotation-cache", action="store_true",
                   help="decode the label planes every time")
    add_tokens(p)
    add_dist_timeout(p)
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Capture (or reuse) a store over a concept dataset, score it, write CSV/JSON."""
    from ..datasets import open_dataset
    from ..errors import DissectError
    from ..hooks import capture
    from ..models import Preprocess
    from ..netdissect import dissect

    check_out_folder(args.out)
    with dist_session(args) as ctx:
        distributed = ctx if ctx is not None else False
        model, transform = load_cli_model(args)
        data = open_dataset(args.dataset)
        missing = [a for a in ("concepts", "categories") if not hasattr(data, a)]
        if missing:  # refused before the capture, not after it
            raise DissectError(
                f"--dataset {args.dataset} has no concept labels (no .{missing[0]}): Network "
                "Dissection needs concept masks; give broden:PATH, a Broden folder or "
                "synthetic[:N] (for unlabeled images, use dissect capture or dissect deconv)")
        # keep pixels aligned with the segmentation: normalization only, no resize or crop
        data.transform = (transform.without_resize() if isinstance(transform, Preprocess)
                          else transform)
        layers = args.layers
        make_out_folder(args.out)
        store = capture(model, data, layers, args.out / "activations.h5",
                        batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                        num_workers=args.num_workers, progress=not args.quiet,
                        distributed=distributed, dataset=args.dataset, tokens=args.tokens)
        try:
            result = dissect(store, data, layers, quantile=args.quantile,
                             iou_threshold=args.iou_threshold, categories=args.categories,
                             batch_size=args.batch_size, device=args.device,
                             progress=not args.quiet, num_workers=args.num_workers,
                             distributed=distributed, engine=args.engine, area=args.area,
                             checkpoint=args.out / "netdissect.ckpt" if ctx is None else None,
                             checkpoint_every=args.checkpoint_every, overwrite=args.restart,
                             annotation_cache=(False if args.no_annotation_cache
                                               else args.annotation_cache or True))
            if ctx is None or ctx.is_main:  # every rank holds the same result; one writes it
                result.to_csv(args.out)
                result.to_json(args.out / "netdissect.json")
                (args.out / "run.json").write_text(json.dumps(
                    {"model": args.model, "weights": args.weights, "dataset": args.dataset,
                     "images": len(data), "layers": layers, "device": str(args.device or "auto")}))
                if args.unit_images > 0:
                    from ..report import render_unit_images

                    render_unit_images(result, store, data, args.out / "units",
                                       units=args.unit_images, k=args.k,
                                       progress=not args.quiet)
                out(result.summary())
                out(f"wrote {args.out / 'netdissect.json'} and one CSV per layer in {args.out}; "
                    f"`dissect report {args.out}` renders the report")
        finally:
            store.close()
    return 0
