"""``dissect data broden DIR``: download Broden (resumable, verified) and unpack it atomically."""

from __future__ import annotations

import argparse
import re

from .._common import add_verbosity, check_out_folder, nonempty, out, path, positive_float

HELP = "download Broden (resumable, checksum) and unpack it atomically into DIR"
DESCRIPTION = (
    "Download Broden's zip (default: the official netdissect.csail.mit.edu URL) with a "
    "progress bar into DIR, resume a partial download with an HTTP Range request, verify it "
    "(its size, the CRC-32 of every member, and its SHA-256 when --sha256 is given: no "
    "official checksum is published, so the SHA-256 is logged for you to pin), unpack it into "
    "DIR/broden1_<resolution> through a temporary folder and a rename, and print that path "
    "(Broden(PATH), --dataset broden:PATH). An interrupted download is resumed by running the "
    "same command again; a folder already unpacked is printed without downloading.")


def _hex_sha256(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        raise argparse.ArgumentTypeError(f"expected a SHA-256 of 64 hex digits, got {text!r}")
    return text.strip().lower()


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the action on ``sub`` (the ``data`` subparsers object)."""
    p = sub.add_parser("broden", help=HELP, description=DESCRIPTION)
    p.add_argument("dir", type=path, metavar="DIR",
                   help="folder that receives broden1_<resolution> (created if missing)")
    p.add_argument("--url", type=nonempty, default=None,
                   help="where to download the zip (default: the official "
                        "http://netdissect.csail.mit.edu/data/broden1_<resolution>.zip)")
    p.add_argument("--sha256", type=_hex_sha256, default=None, metavar="HEX",
                   help="expected SHA-256 of the zip (default: not checked; logged)")
    p.add_argument("--resolution", type=int, choices=(224, 227), default=224,
                   help="image size of the release (224)")
    p.add_argument("--keep-zip", action="store_true",
                   help="keep DIR/broden1_<resolution>.zip after unpacking")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                   help="seconds to wait for the server before giving up (60)")
    add_verbosity(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Download and unpack; print the Broden folder."""
    from ...datasets.download import download_broden

    check_out_folder(args.dir, "DIR")
    root = download_broden(args.dir, url=args.url, sha256=args.sha256,
                           resolution=args.resolution, keep_zip=args.keep_zip,
                           progress=not args.quiet, timeout=args.timeout)
    out(str(root.resolve()))
    return 0
