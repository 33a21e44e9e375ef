"""The similarity and geometry results a report shows on its Layers page, computed and written
into a results folder: what ``dissect similarity`` and ``dissect demo`` call."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

QUERIES = 4  # query images whose nearest examples the report shows
NEIGHBOURS = 5


@dataclass
class LayerResults:
    """What :func:`write_layer_results` computed and wrote."""

    similarity: Any  # SimilarityResult
    intrinsic_dimension: Any = None  # LayerCurve, without geometry None
    relative_contrast: Any = None  # LayerCurve
    embedding: Any = None  # Embedding
    paths: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """The CKA table, and the intrinsic dimension per layer when computed."""
        parts = [self.similarity.summary()]
        if self.intrinsic_dimension is not None:
            parts.append(self.intrinsic_dimension.summary())
        return "\n".join(parts)


def write_layer_results(
    store: Any,
    out_dir: str | Path,
    layers: Any = None,
    *,
    other: Any = None,
    other_layers: Any = None,
    pool: str | None = "mean",
    debiased: bool = False,
    max_dim: int = 8192,
    geometry: bool = True,
    dataset: Any = None,
    batch_size: int = 1024,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LayerResults:
    """Compute and write CKA (and the geometry) of a store's layers into ``out_dir/layers/``.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`.
    out_dir
        The results folder (shared with other analyses; this writes its ``layers/``).
    layers, other, other_layers, pool, debiased, max_dim, batch_size, seed, device, progress
        As for :func:`dissect.similarity.cka_matrix` (``seed`` also picks the query rows and
        the embedding's).
    geometry
        Also write the intrinsic-dimension and relative-contrast curves, a PCA of the last
        layer (coloured by the dataset's ``targets`` when it has them) and the nearest
        examples of a few query rows in a middle and the last layer, with thumbnails.
    dataset
        The dataset the store was captured from (for labels and thumbnails); ``None``: the one
        the store records (``capture(..., dataset=SPEC)``), if any.

    Returns
    -------
    LayerResults
        The results (``similarity``, ``intrinsic_dimension``, ``relative_contrast``,
        ``embedding``; ``None`` without ``geometry``) and the files written (``paths``).
    """
    import numpy as np

    from .._plumbing.store_layers import store_layers
    from ..similarity import cka_matrix
    from .curves import distance_concentration_curve, intrinsic_dimension_curve
    from .embedding import embed

    folder = Path(out_dir) / "layers"
    result = cka_matrix(store, layers, other=other, other_layers=other_layers, pool=pool,
                        debiased=debiased, max_dim=max_dim, batch_size=batch_size, seed=seed,
                        device=device, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [result.to_json(folder / "similarity.json"),
             result.to_csv(folder / "similarity.csv"), result.plot(folder / "similarity.png")]
    if not geometry:
        return LayerResults(result, paths=paths)
    names = store_layers(store, layers, what="analyse")
    pool = pool or "mean"
    curve = intrinsic_dimension_curve(store, names, pool=pool, seed=seed, device=device,
                                      progress=progress)
    contrast = distance_concentration_curve(store, names, pool=pool, seed=seed, device=device,
                                            progress=progress)
    paths += [curve.to_json(folder / "intrinsic_dimension.json"),
              curve.plot(folder / "intrinsic_dimension.png"),
              contrast.to_json(folder / "relative_contrast.json"),
              contrast.plot(folder / "relative_contrast.png")]
    data = dataset if dataset is not None else _dataset(store)
    targets = getattr(data, "targets", None)
    labels = None
    if targets is not None:
        labels = np.asarray(targets)[store.index]
    label_names = getattr(data, "target_names", None)
    emb = embed(store, names[-1], method="pca", pool=pool, seed=seed, device=device,
                progress=progress)
    paths += [emb.to_json(folder / "embedding.json"),
              emb.plot(labels=labels, path=folder / "embedding.png", names=label_names)]
    if labels is not None:
        np.save(folder / "labels.npy", labels)
        if label_names is not None:
            (folder / "label_names.json").write_text(json.dumps(list(label_names)))
    paths.append(_nearest_examples(store, names, data, folder, pool, seed, device, progress))
    return LayerResults(result, curve, contrast, emb, paths)


def _dataset(store: Any) -> Any:
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


def _nearest_examples(store: Any, layers: list[str], data: Any, folder: Path, pool: str,
                      seed: int, device: Any, progress: bool) -> Path:
    """Nearest stored rows of a few seeded query rows in two layers, with thumbnails."""
    import numpy as np

    from .._plumbing.images import write_png
    from .._plumbing.items import split_item
    from ..similarity import nearest

    rng = np.random.default_rng(seed)
    n = len(store)
    queries = sorted(rng.choice(n, size=min(QUERIES, n - 1), replace=False).tolist())
    chosen = [layers[len(layers) // 2], layers[-1]] if len(layers) > 1 else layers
    index = store.index
    thumbs = folder / "nearest"
    entries, needed = [], set(queries)
    for layer in dict.fromkeys(chosen):
        rows, dist = nearest(store, layer, queries, k=min(NEIGHBOURS, n - 1), pool=pool,
                             device=device, progress=progress)
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
