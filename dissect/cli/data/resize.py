"""``dissect data resize SRC DST --size S``: a Broden (or SegmentationFolder) at another size."""

from __future__ import annotations

import argparse

from .._common import add_verbosity, check_out_folder, out, path, side

HELP = "write a Broden (or convert a SegmentationFolder) at another resolution"
DESCRIPTION = (
    "Write the concept dataset SRC (a Broden folder with index.csv, or a SegmentationFolder "
    "with labels.csv) as a Broden in DST with SxS images (area shrinking, linear enlarging) "
    "and label planes of S//2 x S//2 pixels (nearest label, pixel centers aligned), for "
    "networks trained on other image sizes (CIFAR-size: --size 32). Image-level labels are "
    "kept. Prints DST (Broden(DST), --dataset broden:DST).")


def _size(text: str) -> int:
    value = side(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an image side of at least 2 pixels (label "
                                         f"planes are S//2), got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the action on ``sub`` (the ``data`` subparsers object)."""
    p = sub.add_parser("resize", help=HELP, description=DESCRIPTION)
    p.add_argument("src", type=path, metavar="SRC", help="a Broden or a SegmentationFolder")
    p.add_argument("dst", type=path, metavar="DST", help="folder of the new Broden")
    p.add_argument("--size", type=_size, required=True, metavar="S",
                   help="image side in pixels; label planes are S//2")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png",
                   help="format of the written images (png: lossless)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a DST that already holds a Broden")
    add_verbosity(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Resize and write; print the new Broden folder."""
    from ...datasets.resize import resize_dataset

    check_out_folder(args.dst, "DST")
    root = resize_dataset(args.src, args.dst, args.size, image_format=args.image_format,
                          overwrite=args.overwrite, progress=not args.quiet)
    out(str(root.resolve()))
    return 0
