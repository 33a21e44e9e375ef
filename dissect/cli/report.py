"""``dissect report``: render the HTML report of a results folder (no recomputation)."""

from __future__ import annotations

import argparse

from ._common import check_out_folder, out, path

HELP = "render the static HTML report of a results folder"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("report", help=HELP, description=HELP)
    p.add_argument("results", type=path,
                   help="folder written by dissect demo / netdissect / probe")
    p.add_argument("--out", type=path, default=None, help="site folder (RESULTS/report)")
    p.add_argument("--quiet", action="store_true", help="no info messages")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report and print the path of its index page."""
    from ..report import write_report

    if args.results.is_dir():  # a missing folder is write_report's own one-line error
        check_out_folder(args.out if args.out is not None else args.results / "report",
                         "--out" if args.out is not None else "the report folder")
    index = write_report(args.results, args.out)
    out(f"report: {index.resolve()}")
    return 0
