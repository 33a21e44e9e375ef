"""``dissect capture``: stream layer activations over a dataset to an HDF5 store.

Under ``torchrun --nproc_per_node=N -m dissect capture ...`` every rank captures a shard and
rank 0 publishes the store (:mod:`dissect.distributed`); only rank 0 prints.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._common import (
    MAX_SIDE,
    add_common,
    add_model_args,
    add_tokens,
    check_out_file,
    load_cli_model,
    names,
    non_negative,
    nonempty,
    out,
    path,
)

if TYPE_CHECKING:
    from ..distributed import DistContext

HELP = "stream layer activations over a dataset to HDF5"
MAX_MINUTES = 10**7  # --dist-timeout: about 19 years, far below what timedelta holds


def _pool(text: str) -> str | int:
    if text in ("mean", "max"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SIDE:
        raise argparse.ArgumentTypeError(
            f"expected mean, max or an output size from 1 to {MAX_SIDE}, got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("capture", help=HELP, description=HELP)
    add_model_args(p)
    p.add_argument("--data", required=True, type=nonempty,
                   help="a folder of images, samples, synthetic[:N] or broden:PATH")
    p.add_argument("--layers", required=True, type=names, help="comma-separated layer names")
    p.add_argument("--out", required=True, type=path, help="HDF5 file to write")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--pool", type=_pool, default=None, help="mean, max or an output size")
    p.add_argument("--grads-for", type=non_negative, default=None, metavar="CLASS",
                   help="also store gradients of this output index")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished file")
    add_tokens(p)
    add_dist_timeout(p)
    add_common(p)
    return p


def _minutes(text: str) -> datetime.timedelta:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_MINUTES:  # NaN and inf too
        raise argparse.ArgumentTypeError(
            f"--dist-timeout takes minutes, more than 0 and at most {MAX_MINUTES}, got {text!r}")
    return datetime.timedelta(minutes=value)


def add_dist_timeout(p: argparse.ArgumentParser) -> None:
    """``--dist-timeout MINUTES`` for runs under torchrun (shared with ``netdissect``)."""
    p.add_argument("--dist-timeout", type=_minutes, default=datetime.timedelta(minutes=30),
                   metavar="MINUTES", help="under torchrun: how long a rank waits for the "
                   "others (a dead or stuck rank) before failing (30)")


@contextmanager
def dist_session(args: argparse.Namespace) -> Iterator[DistContext | None]:
    """The multi-process session of a subcommand (``None`` in one process).

    Ranks other than 0 log warnings only, so a run on 8 GPUs does not say everything 8 times.
    """
    from ..distributed import session

    with session(args.dist_timeout, args.device) as ctx:
        if ctx is not None and not ctx.is_main:
            logging.getLogger("dissect").setLevel(logging.WARNING)
        yield ctx


def run(args: argparse.Namespace) -> int:
    """Capture activations of a model over a data source into an HDF5 store."""
    from ..datasets import open_dataset
    from ..hooks import capture

    check_out_file(args.out, example="activations.h5")
    with dist_session(args) as ctx:
        model, transform = load_cli_model(args)
        data = open_dataset(args.data, transform)
        store = capture(
            model, data, args.layers, args.out,
            batch_size=args.batch_size, dtype=args.dtype, pool=args.pool,
            grads_for=args.grads_for, device=args.device, num_workers=args.num_workers,
            progress=not args.quiet, resume=not args.no_resume, overwrite=args.overwrite,
            distributed=ctx if ctx is not None else False, dataset=args.data,
            tokens=args.tokens,
        )
        try:
            if ctx is None or ctx.is_main:
                for layer in store.layers:
                    out(f"{layer}: {store[layer].shape} {store[layer].dtype}")
                out(f"wrote {store.path}")
        finally:
            store.close()
    return 0
