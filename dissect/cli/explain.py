"""``dissect explain``: compositional explanations of units (formulas of concepts) from a store,
written where ``dissect report`` finds them."""

from __future__ import annotations

import argparse

from ._common import (
    add_common,
    check_out_folder,
    make_out_folder,
    names,
    nonempty,
    open_fraction,
    out,
    path,
    positive,
    units,
)

HELP = "compositional explanations: formulas of concepts (AND, OR, AND NOT) for each unit"
OPERATORS = ("AND", "OR", "AND NOT")


def _operators(text: str) -> list[str]:
    found = [s.strip().upper() for s in text.split(",") if s.strip()]
    bad = [s for s in found if s not in OPERATORS]
    if not found or bad:
        raise argparse.ArgumentTypeError(
            f"--operators takes a comma-separated subset of {', '.join(OPERATORS)}; got {text!r}")
    return found


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "explain", help=HELP, description=HELP + " (Mu & Andreas, NeurIPS 2020). Reads a store "
        "captured over a concept dataset (e.g. OUT/activations.h5 of `dissect netdissect`) and "
        "writes OUT/explanations/<layer>.json and .csv; `dissect report OUT` shows each unit's "
        "formula on its card.")
    p.add_argument("store", type=path, help="an activation store captured over the dataset")
    p.add_argument("--dataset", type=nonempty, default=None,
                   help="the concept dataset (synthetic[:N] or broden:PATH; default: the one "
                        "the store records)")
    p.add_argument("--layers", type=names, default=None,
                   help="comma-separated layers (default: every layer of the store)")
    p.add_argument("--units", type=units, default=None, help="units, e.g. 0-15 or 3,7 (all)")
    p.add_argument("--length", type=positive, default=3, help="most concepts per formula (3)")
    p.add_argument("--beam", type=positive, default=5, help="formulas kept per step (5)")
    p.add_argument("--operators", type=_operators, default=list(OPERATORS),
                   help="comma-separated operators (AND,OR,AND NOT)")
    p.add_argument("--quantile", type=open_fraction, default=0.005,
                   help="top fraction of activations that counts as active (0.005)")
    p.add_argument("--categories", type=names, default=None,
                   help="comma-separated concept categories (all)")
    p.add_argument("--out", type=path, default=None,
                   help="results folder (shared with other runs; this writes "
                        "OUT/explanations/); default: the folder holding STORE")
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Explain every chosen unit of each layer; write JSON and CSV, print the summaries."""
    from .._plumbing.paths import safe_name
    from .._plumbing.store_layers import store_layers
    from ..datasets import open_dataset
    from ..errors import DissectError
    from ..netdissect import explain
    from ..store import ActivationStore

    if args.out is None:
        args.out = args.store.resolve().parent
    check_out_folder(args.out)
    with ActivationStore(args.store) as store:
        spec = args.dataset or store.meta.get("dataset")
        if not spec:
            raise DissectError(f"{args.store} does not record its dataset: give --dataset "
                               "(synthetic:N or broden:PATH, the data it was captured over)")
        data = open_dataset(spec)
        if not hasattr(data, "concepts"):  # before any counting
            raise DissectError(f"--dataset {spec} has no concept annotations: explanations "
                               "need a concept dataset (synthetic:N or broden:PATH)")
        folder = args.out / "explanations"
        make_out_folder(folder)
        for layer in store_layers(store, args.layers):
            result = explain(store, data, layer, args.units, length=args.length,
                             beam=args.beam, operators=args.operators,
                             quantile=args.quantile, categories=args.categories,
                             progress=not args.quiet, batch_size=args.batch_size,
                             device=args.device, num_workers=args.num_workers)
            saved = result.to_json(folder / f"{safe_name(layer)}.json")
            result.to_csv(folder / f"{safe_name(layer)}.csv")
            out(result.summary())
            out(f"wrote {saved}")
    out(f"`dissect report {args.out}` shows the formulas on the unit cards")
    return 0
