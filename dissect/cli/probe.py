"""``dissect probe``: per-layer linear probes (with controls) on a captured store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_common, out, split_list

HELP = "linear probes per layer, with permuted-label controls"


def _pool(text: str) -> str | None:
    if text in ("mean", "max"):
        return text
    if text == "none":
        return None
    raise argparse.ArgumentTypeError("--pool takes mean, max or none (flatten)")


def _reg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--reg takes auto or a positive number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("--reg takes auto or a positive number")
    return value


def _test_size(text: str) -> float | int:
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--test-size takes a fraction or a row count") from None


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "probe", help=HELP, description=HELP + ". Writes probes.csv, probes.json and "
        "probes.png to --out and prints the table.")
    p.add_argument("store", type=Path, help="an activation store (HDF5) made by dissect capture")
    p.add_argument("--labels", required=True,
                   help="'targets' (the dataset's targets, read through the store's row "
                        "index) or a .npy/.txt file with one integer class per store row")
    p.add_argument("--dataset", default=None,
                   help="with --labels targets: the data source captured (synthetic[:N], "
                        "broden:PATH, ...); default: the one the store records, else "
                        "synthetic")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--pool", type=_pool, default="mean", help="mean, max or none (mean)")
    p.add_argument("--seed", type=int, default=0, help="split, control and projection seed (0)")
    p.add_argument("--test-size", type=_test_size, default=0.25,
                   help="held-out share or row count (0.25)")
    p.add_argument("--reg", type=_reg, default="auto",
                   help="L2 strength (loss = mean CE + reg/2 ||W||^2) or auto (auto)")
    p.add_argument("--max-features", type=int, default=None,
                   help="reduce wider layers to this many features (PCA)")
    p.add_argument("--no-control", action="store_true", help="skip the permuted-label control")
    add_common(p)
    return p


def _labels(args: argparse.Namespace, store) -> object:
    import numpy as np

    from ..errors import DataError
    from ..probes import dataset_targets

    if args.labels == "targets":
        return dataset_targets(store, args.dataset)
    path = Path(args.labels)
    if not path.is_file():
        raise DataError(f"--labels {args.labels!r}: no such file (give 'targets' or a .npy file)")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read labels from {path}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Probe the store's layers, write CSV/JSON/PNG, print the summary."""
    from ..errors import DissectError
    from ..probes import probe
    from ..store import ActivationStore

    with ActivationStore(args.store) as store:
        labels = _labels(args, store)
        result = probe(
            store, labels, split_list(args.layers) if args.layers else None,
            pool=args.pool, test_size=args.test_size, seed=args.seed, reg=args.reg,
            max_features=args.max_features, control=not args.no_control, device=args.device,
            progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [result.to_csv(args.out / "probes.csv"), result.to_json(args.out / "probes.json")]
    try:
        paths.append(result.plot(args.out / "probes.png"))
    except DissectError as exc:  # pragma: no cover - matplotlib missing
        out(f"no plot: {exc}")
    out(result.summary())
    out("wrote " + ", ".join(str(p) for p in paths))
    return 0
