"""``dissect similarity``: layer-by-layer CKA, intrinsic dimension, an embedding and nearest
examples from captured stores, written where ``dissect report`` finds them."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ._common import (
    add_common,
    check_out_folder,
    make_out_folder,
    names,
    out,
    path,
    positive,
    seed,
)

HELP = "layer similarity (CKA) and geometry (intrinsic dimension, PCA, nearest examples)"

log = logging.getLogger(__name__)

QUERIES = 4  # query images whose nearest examples the report shows
NEIGHBOURS = 5


def _pool(text: str) -> str | None:
    if text in ("mean", "flatten"):
        return text
    if text == "none":
        return None
    raise argparse.ArgumentTypeError("--pool takes mean, flatten or none")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "similarity", help=HELP, description=HELP + ". Writes OUT/layers/: similarity.json/"
        ".csv/.png, intrinsic_dimension.json/.png, relative_contrast.json/.png, "
        "embedding.json/.png and nearest.json (with thumbnails when the store records its "
        "dataset); `dissect report OUT` renders them on a Layers page.")
    p.add_argument("store", type=path, help="an activation store (HDF5) made by dissect capture")
    p.add_argument("--other", type=path, default=None,
                   help="a second store over the same images (another model): CKA between "
                        "the two stores' layers")
    p.add_argument("--out", required=True, type=path,
                   help="results folder (shared with other runs; this writes OUT/layers/)")
    p.add_argument("--layers", type=names, default=None, help="comma-separated layers (all)")
    p.add_argument("--other-layers", type=names, default=None,
                   help="layers of --other (all)")
    p.add_argument("--pool", type=_pool, default="mean",
                   help="how spatial maps become vectors: mean, flatten or none (mean)")
    p.add_argument("--debiased", action="store_true",
                   help="debiased CKA (unbiased HSIC): near 0 for unrelated layers")
    p.add_argument("--max-dim", type=positive, default=8192,
                   help="wider layers are sketched, with a stated error bound (8192)")
    p.add_argument("--seed", type=seed, default=0, help="sketch, query and embedding seed (0)")
    p.add_argument("--no-geometry", action="store_true",
                   help="CKA only: skip intrinsic dimension, embedding and nearest examples")
    add_common(p, batch=1024)
    return p


def _dataset(store):
    """The dataset the store records (``None`` when it records none, or it cannot open)."""
    from ..datasets import open_dataset
    from ..errors import DissectError

    spec = store.meta.get("dataset")
    if not isinstance(spec, str) or not spec:
        return None
    try:
        return open_dataset(spec)
    except (DissectError, OSError) as exc:
        log.warning("cannot open the dataset %r the store records (%s): no labels or "
                    "thumbnails", spec, exc)
        return None


def _nearest_examples(store, layers: list[str], data, folder: Path, pool, args) -> Path:
    """Nearest stored rows of a few seeded query rows in two layers, with thumbnails."""
    import numpy as np

    from .._plumbing.images import write_png
    from .._plumbing.items import split_item
    from ..similarity import nearest

    rng = np.random.default_rng(args.seed)
    n = len(store)
    queries = sorted(rng.choice(n, size=min(QUERIES, n - 1), replace=False).tolist())
    chosen = [layers[len(layers) // 2], layers[-1]] if len(layers) > 1 else layers
    index = store.index
    thumbs = folder / "nearest"
    entries, needed = [], set(queries)
    for layer in dict.fromkeys(chosen):
        rows, dist = nearest(store, layer, queries, k=min(NEIGHBOURS, n - 1), pool=pool or "mean",
                             device=args.device, progress=not args.quiet)
        entries.append({"layer": layer, "queries": queries, "rows": rows.tolist(),
                        "distances": dist.tolist()})
        needed.update(rows.ravel().tolist())
    images = {}
    if data is not None:
        thumbs.mkdir(parents=True, exist_ok=True)
        saved_transform = getattr(data, "transform", None)
        if hasattr(data, "transform"):
            data.transform = None  # raw RGB in [0, 1] for the thumbnails
        try:
            for row in sorted(needed):
                image, _ = split_item(data[int(index[row])], row)
                name = f"row_{row}.png"
                write_png(thumbs / name, image)
                images[str(row)] = f"nearest/{name}"
        finally:
            if hasattr(data, "transform"):
                data.transform = saved_transform
    record = {"metric": "cosine", "pool": pool, "entries": entries, "images": images,
              "index": {str(r): int(index[r]) for r in sorted(needed)}}
    target = folder / "nearest.json"
    target.write_text(json.dumps(record))
    return target


def run(args: argparse.Namespace) -> int:
    """Compute CKA (and the geometry), write the results and figures, print the summary."""
    from .._plumbing.store_layers import store_layers
    from ..geometry import distance_concentration_curve, embed, intrinsic_dimension_curve
    from ..similarity import cka_matrix
    from ..store import ActivationStore

    check_out_folder(args.out)
    folder = args.out / "layers"
    with ActivationStore(args.store) as store:
        other = ActivationStore(args.other) if args.other is not None else None
        try:
            result = cka_matrix(store, args.layers, other=other, other_layers=args.other_layers,
                                pool=args.pool, debiased=args.debiased, max_dim=args.max_dim,
                                batch_size=args.batch_size, seed=args.seed, device=args.device,
                                progress=not args.quiet)
        finally:
            if other is not None:
                other.close()
        make_out_folder(folder)
        paths = [result.to_json(folder / "similarity.json"),
                 result.to_csv(folder / "similarity.csv"), result.plot(folder / "similarity.png")]
        out(result.summary())
        if not args.no_geometry:
            layers = store_layers(store, args.layers, what="analyse")
            pool = args.pool or "mean"
            curve = intrinsic_dimension_curve(store, layers, pool=pool, seed=args.seed,
                                              device=args.device, progress=not args.quiet)
            contrast = distance_concentration_curve(store, layers, pool=pool, seed=args.seed,
                                                    device=args.device, progress=not args.quiet)
            paths += [curve.to_json(folder / "intrinsic_dimension.json"),
                      curve.plot(folder / "intrinsic_dimension.png"),
                      contrast.to_json(folder / "relative_contrast.json"),
                      contrast.plot(folder / "relative_contrast.png")]
            out(curve.summary())
            data = _dataset(store)
            labels = None
            targets = getattr(data, "targets", None)
            if targets is not None:
                import numpy as np

                labels = np.asarray(targets)[store.index]
            label_names = getattr(data, "target_names", None)
            emb = embed(store, layers[-1], method="pca", pool=pool, seed=args.seed,
                        device=args.device, progress=not args.quiet)
            paths += [emb.to_json(folder / "embedding.json"),
                      emb.plot(labels=labels, path=folder / "embedding.png", names=label_names)]
            if labels is not None:
                np.save(folder / "labels.npy", labels)
                if label_names is not None:
                    (folder / "label_names.json").write_text(json.dumps(list(label_names)))
            paths.append(_nearest_examples(store, layers, data, folder, args.pool, args))
    out("wrote " + ", ".join(str(p) for p in paths)
        + f"; `dissect report {args.out}` renders them")
    return 0
