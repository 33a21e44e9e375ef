"""``dissect data check``: validate a segmentation folder or a Broden, print a summary."""

from __future__ import annotations

import argparse

from .._common import add_verbosity, check_out_file, out, path

HELP = "validate a segmentation folder or a Broden (reads every file), print a summary"
DESCRIPTION = (
    "Read every image and label plane of a concept-data folder (a segmentation folder with "
    "labels.csv, images/ and masks/, or a Broden with index.csv) and print its images, "
    "categories (images annotated, unannotated share) and concepts (pixels, images). The "
    "first bad file is one error line naming it, with exit code 1.")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the action on ``sub`` (the ``dissect data`` subparsers object)."""
    p = sub.add_parser("check", help=HELP, description=DESCRIPTION)
    p.add_argument("folder", type=path, metavar="DIR",
                   help="a segmentation folder or a Broden folder")
    p.add_argument("--json", type=path, default=None, metavar="OUT.json",
                   help="also write the summary as JSON to this file")
    add_verbosity(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Check the folder; print the summary (and write the JSON)."""
    from ...datasets.check import check_dataset

    if args.json is not None:  # before reading the whole folder
        check_out_file(args.json, "--json", "check.json")
    result = check_dataset(args.folder, progress=not args.quiet)
    if args.json is not None:
        result.to_json(args.json)
    out(result.summary())
    return 0
