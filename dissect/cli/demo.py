"""``dissect demo``: every analysis on the real ImageNet MobileNetV2, offline, and the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_common, check_out_folder, out, path

HELP = "run every analysis on the real ImageNet MobileNetV2 and write the report"


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("demo", help=HELP, description=HELP)
    p.add_argument("--out", type=path, default=Path("demo-out"), help="results folder (demo-out)")
    p.add_argument("--fast", action="store_true", help="a smaller run (about a minute; tests)")
    add_common(p, batch=16)
    return p


def run(args: argparse.Namespace) -> int:
    """Run :func:`dissect.demo.run_demo` and print a short summary and the report's path."""
    from ..demo import run_demo

    check_out_folder(args.out)
    run = run_demo(args.out, fast=args.fast, device=args.device, batch_size=args.batch_size,
                   num_workers=args.num_workers, progress=not args.quiet)
    out("MobileNetV2 (real ImageNet weights) on the bundled photographs:")
    for p in run["predictions"]:
        out(f"  {p['name']:<10} -> {p['label']} ({p['prob']:.2f})")
    out(run["summary"])
    out(run["probes"])
    total = sum(run["seconds"].values())
    out("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in run["seconds"].items())
        + f" (total {total:.0f})")
    out(f"report: {Path(run['report']).resolve()}")
    return 0
