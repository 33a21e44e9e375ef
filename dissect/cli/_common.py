"""Options and helpers shared by every subcommand, so they behave the same everywhere."""

from __future__ import annotations

import argparse
import sys


def add_common(p: argparse.ArgumentParser, batch: int = 64) -> None:
    """Add ``--device``, ``--batch-size``, ``--num-workers`` and ``--quiet`` to a subcommand."""
    g = p.add_argument_group("common options")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.add_argument("--batch-size", type=int, default=batch, help=f"samples per batch ({batch})")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or info messages")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Add the positional MODEL spec and ``--weights``."""
    p.add_argument("model", help="torchvision:NAME, mobilenet_v2-imagenet or file.py:factory")
    p.add_argument("--weights", default=None, help=".pth file or torchvision weights enum name")


def add_k(p: argparse.ArgumentParser, default: int, what: str) -> None:
    """``-k``/``--k`` (alias ``--top-k``): how many top images, the library's ``k=``."""
    p.add_argument("-k", "--k", "--top-k", dest="k", type=positive, default=default,
                   metavar="K", help=f"{what} ({default})")


def positive(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def split_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (for ``--layers`` and ``--categories``)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def units(text: str) -> list[int]:
    """Parse a unit list such as ``0-15``, ``3,7,9`` or ``0-3,10`` (argparse type)."""
    result: list[int] = []
    try:
        for part in split_list(text):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                result.extend(range(lo, hi + 1))
            else:
                result.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"units take a list like 0-15 or 3,7,9; got {text!r}") from None
    if not result or min(result) < 0:
        raise argparse.ArgumentTypeError(f"units must be non-negative integers; got {text!r}")
    return result


def out(text: str = "") -> None:
    """Write one line of a command's result to stdout (library code only logs)."""
    sys.stdout.write(text + "\n")
