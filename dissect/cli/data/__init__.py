"""``dissect data``: check, download and resize concept datasets.

Each action is a module of this package with ``HELP``, ``add_parser(sub)`` and ``run(args)``,
like the top-level subcommands; ``ACTIONS`` lists them in the order ``dissect data --help``
shows.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "concept data: check a folder, download Broden, resize a dataset"
ACTIONS = ("check", "broden", "resize")
DESCRIPTION = """Concept data, managed.

  dissect data check DIR                 validate a SegmentationFolder or a Broden, print a summary
  dissect data broden DIR                download Broden (resumable, checksum), unpack atomically
  dissect data resize SRC DST --size S   write a Broden at another resolution (labels at S/2)
"""


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``data`` and its actions on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("data", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="data_action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    for name in ACTIONS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(actions).set_defaults(func=module.run)
    return p


def run(args: argparse.Namespace) -> int:
    """Never called: each action sets its own ``func``."""
    raise AssertionError("dissect data: an action's own run() handles it")
