"""``dissect report``: render the HTML report of a results folder (no recomputation)."""

from __future__ import annotations

import argparse

from ._common import add_verbosity, check_out_folder, out, path

HELP = "render the static HTML report of a results folder"
DESCRIPTION = (
    "Render the static HTML report of a results folder. Subcommands run with the same --out "
    "RESULTS add to one folder (netdissect.json, explanations, ablation/, probes.json, "
    "layers/, attribution/attribution.json; repeated `dissect attribute` runs add their maps "
    "to the entries there), and the report shows everything it finds.")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("report", help=HELP, description=DESCRIPTION)
    p.add_argument("results", type=path,
                   help="folder written by dissect demo / netdissect / explain / ablate / "
                        "probe / similarity / attribute (--out RESULTS)")
    p.add_argument("--out", type=path, default=None, help="site folder (RESULTS/report)")
    add_verbosity(p)
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
