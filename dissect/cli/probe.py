"""``dissect probe``: per-layer linear probes (with controls) on a captured store."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ._common import (
    add_common,
    check_out_folder,
    make_out_folder,
    names,
    nonempty,
    out,
    path,
    positive,
    seed,
)

HELP = "linear probes per layer, with permuted-label controls"


def _pool(text: str) -> str | None:
    if text in ("mean", "max", "cls"):
        return text
    if text == "none":
        return None
    raise argparse.ArgumentTypeError(
        "--pool takes mean, max, cls (a transformer layer's class token) or none (flatten)")


def _reg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):  # NaN and inf too
        raise argparse.ArgumentTypeError(f"--reg takes auto or a positive number, got {text!r}")
    return value


def _test_size(text: str) -> float | int:
    try:
        if text.strip().isdigit():
            value: float | int = int(text)
            ok = value >= 1
        else:
            value = float(text)
            ok = 0 < value < 1  # NaN too
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"--test-size takes a fraction between 0 and 1 or a row count >= 1, got {text!r}")
    return value


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "probe", help=HELP, description=HELP + ". Writes probes.csv, probes.json and "
        "probes.png to --out and prints the table.")
    p.add_argument("store", type=path, help="an activation store (HDF5) made by dissect capture")
    p.add_argument("--labels", required=True, type=nonempty,
                   help="'targets' (the dataset's targets, read through the store's row "
                        "index) or a .npy/.txt file with one integer class per store row")
    p.add_argument("--dataset", type=nonempty, default=None,
                   help="with --labels targets: the data source captured (synthetic[:N], "
                        "broden:PATH, ...); default: the one the store records, else "
                        "synthetic")
    p.add_argument("--out", required=True, type=path, help="output folder")
    p.add_argument("--layers", type=names, default=None,
                   help="comma-separated layers (default: all)")
    p.add_argument("--pool", type=_pool, default="mean",
                   help="mean, max, cls (a transformer layer's class token) or none (mean)")
    p.add_argument("--seed", type=seed, default=0, help="split, control and projection seed (0)")
    p.add_argument("--test-size", type=_test_size, default=0.25,
                   help="held-out share or row count (0.25)")
    p.add_argument("--reg", type=_reg, default="auto",
                   help="L2 strength (loss = mean CE + reg/2 ||W||^2) or auto (auto)")
    p.add_argument("--max-features", type=positive, default=None,
                   help="reduce wider layers to this many features (PCA)")
    p.add_argument("--no-control", action="store_true", help="skip the permuted-label control")
    add_common(p, batch=None, workers=False)
    return p


def _labels(args: argparse.Namespace, store) -> object:
    import numpy as np

    from ..errors import DataError
    from ..probes import dataset_targets

    if args.labels == "targets":
        return dataset_targets(store, args.dataset)
    file = Path(args.labels)
    if not file.is_file():
        raise DataError(f"--labels {args.labels!r}: no such file (give 'targets' or a .npy file)")
    try:
        with warnings.catch_warnings():  # numpy's "no data" warning: the check below says it
            warnings.simplefilter("ignore")
            if file.suffix == ".npy":
                labels = np.load(file, allow_pickle=False)
            else:
                labels = np.loadtxt(file, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read labels from {file}: {exc}") from exc
    if not isinstance(labels, np.ndarray):
        raise DataError(f"{file} holds no single array of labels (an .npz archive?): save one "
                        "array with numpy.save")
    if labels.size == 0:
        raise DataError(f"{file} holds no labels: give one integer class per store row")
    return labels


def run(args: argparse.Namespace) -> int:
    """Probe the store's layers, write CSV/JSON/PNG, print the summary."""
    from ..errors import DissectError
    from ..probes import probe
    from ..store import ActivationStore

    check_out_folder(args.out)
    with ActivationStore(args.store) as store:
        labels = _labels(args, store)
        result = probe(
            store, labels, args.layers,
            pool=args.pool, test_size=args.test_size, seed=args.seed, reg=args.reg,
            max_features=args.max_features, control=not args.no_control, device=args.device,
            progress=not args.quiet)
    make_out_folder(args.out)
    paths = [result.to_csv(args.out / "probes.csv"), result.to_json(args.out / "probes.json")]
    try:
        paths.append(result.plot(args.out / "probes.png"))
    except DissectError as exc:  # pragma: no cover - matplotlib missing
        out(f"no plot: {exc}")
    out(result.summary())
    out("wrote " + ", ".join(str(p) for p in paths))
    return 0
