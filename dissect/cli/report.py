"""``dissect report``: render the HTML report of a results folder (no recomputation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import out

HELP = "render the static HTML report of a results folder"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("report", help=HELP, description=HELP)
    p.add_argument("results", type=Path,
                   help="folder written by dissect demo / netdissect / probe")
    p.add_argument("--out", type=Path, default=None, help="site folder (RESULTS/report)")
    p.add_argument("--quiet", action="store_true", help="no info messages")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report and print the path of its index page."""
    from ..report import write_report

    index = write_report(args.results, args.out)
    out(f"report: {index.resolve()}")
    return 0
