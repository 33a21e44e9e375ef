"""``dissect compare``: two Network Dissection results (ours, or NetDissect's / Lite's
published CSVs) compared unit by unit, per layer."""

from __future__ import annotations

import argparse
import dataclasses

from ._common import add_verbosity, check_out_file, fraction, out, path

HELP = "compare two Network Dissection results (ours or NetDissect's CSVs) unit by unit"
DESCRIPTION = (
    HELP + ". A and B are each a results folder (netdissect.json), a netdissect.json file, a "
    "NetDissect / NetDissect-Lite result CSV (tally_<layer>.csv, <layer>-result.csv; units "
    "numbered from 1) or a folder of them, or CSVs written by DissectionResult.to_csv. Prints "
    "per layer: units with the same top concept, detectors on each side, and unique detectors "
    "(distinct top concepts; and per category, summed, as the NetDissect paper's plots count).")


def _pairs(text: str) -> dict[str, str]:
    pairs = {}
    for part in text.split(","):
        a, eq, b = part.partition("=")
        a, b = a.strip(), b.strip()
        if not part.strip():
            continue
        if not eq:
            a = b = part.strip()
        if not a or not b:
            raise argparse.ArgumentTypeError(
                f"--layers takes A_LAYER=B_LAYER pairs (or one name for both), comma-separated; "
                f"got {text!r}")
        pairs[a] = b
    if not pairs:
        raise argparse.ArgumentTypeError(f"--layers names no layer: got {text!r}")
    return pairs


def _first_unit(text: str) -> int | str:
    if text not in ("auto", "0", "1"):
        raise argparse.ArgumentTypeError(f"expected auto, 0 or 1, got {text!r}")
    return text if text == "auto" else int(text)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("compare", help=HELP, description=DESCRIPTION)
    p.add_argument("a", type=path, metavar="A", help="a results folder, netdissect.json or CSV(s)")
    p.add_argument("b", type=path, metavar="B", help="the same, for the other side")
    p.add_argument("--layers", type=_pairs, default=None, metavar="A_LAYER=B_LAYER,...",
                   help="layer pairs a=b,... (default: the layers named alike on both sides; "
                        "NetDissect-Lite's tally.csv is the layer 'tally': --layers layer4=tally)")
    p.add_argument("--first-unit", type=_first_unit, default="auto", metavar="{auto,0,1}",
                   help="number of the first unit in CSV files: auto, 0 or 1 (auto: 1 to K in "
                        "NetDissect's format, 0 to K-1 in ours)")
    p.add_argument("--iou-threshold", type=fraction, default=0.04, metavar="IOU",
                   help="detector threshold for CSV inputs (0.04, as NetDissect); results "
                        "folders keep their own")
    p.add_argument("--json", type=path, default=None, metavar="OUT",
                   help="also write the comparison as JSON to this file")
    add_verbosity(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Load both sides, compare them and print the table."""
    from ..netdissect.published import compare_results, load_result

    if args.json is not None:
        check_out_file(args.json, "--json", "comparison.json")
    sides = [load_result(x, first_unit=args.first_unit, iou_threshold=args.iou_threshold)
             for x in (args.a, args.b)]
    result = compare_results(*sides, layers=args.layers)
    result = dataclasses.replace(result, a=str(args.a), b=str(args.b))
    out(result.summary())
    if args.json is not None:
        out(f"comparison: {result.to_json(args.json)}")
    return 0
