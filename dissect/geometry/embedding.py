"""One layer's rows in a few dimensions: :func:`embed` (PCA exactly; t-SNE, UMAP by libraries).

PCA is computed here, exactly (float64): streamed over the rows as the eigendecomposition of the
covariance for layers of at most :data:`STREAM_MAX_DIM` features (memory ``D x D``, two passes),
else as the SVD of the centred rows in memory. Each component's sign makes its entry of
largest magnitude positive (scikit-learn's convention), so results are deterministic.

t-SNE runs through openTSNE (Poličar et al. 2024) and UMAP through umap-learn (McInnes et al.
2018), both installed by the ``geometry`` extra (``pip install 'torch-dissect[geometry]'``);
they need every row in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .._plumbing.checks import positive_int
from .._plumbing.device import resolve_device
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from ..similarity.features import (
    block_rows,
    check_pool,
    feature_dim,
    iter_features,
    store_paths,
    warn_incomplete,
)
from .result import Embedding

log = logging.getLogger(__name__)

STREAM_MAX_DIM = 8192
EXTRA = "pip install 'torch-dissect[geometry]'"


def require(module: str, package: str, what: str) -> Any:
    """Import ``module`` of the ``geometry`` extra, or a DissectError saying how to install it."""
    try:  # the import statement's machinery (honours sys.modules and builtins.__import__)
        return __import__(module)
    except ImportError as exc:
        raise DissectError(f"{what} needs {package}, which is not installed: {EXTRA} (the "
                           f"'geometry' extra), or pip install {package}") from exc


def sign_convention(components: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude (the first such) is positive."""
    pick = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(len(components), device=pick.device), pick])
    signs[signs == 0] = 1
    return components * signs[:, None]


def _blocks(store: Any, layer: str, pool: str | None, batch_size: int, dev: torch.device,
            progress: bool, desc: str):
    n = len(store)
    step = block_rows(store, [layer], batch_size)
    with progress_bar(-(-n // step), desc, progress, unit="block") as bar:
        for start, x in iter_features(store, layer, pool, batch_size, dev):
            yield start, x
            bar.update(1)


def load_features(store: Any, layer: str, pool: str | None, batch_size: int,
                  device: torch.device, progress: bool = False) -> torch.Tensor:
    """Every row of ``layer`` as float64 features ``(N, D)`` in memory."""
    n, d = len(store), feature_dim(store, layer, pool)
    out = torch.empty((n, d), dtype=torch.float64, device=device)
    for start, x in _blocks(store, layer, pool, batch_size, device, progress, f"read {layer}"):
        out[start:start + len(x)] = x
    return out


def _pca_streamed(store: Any, layer: str, pool: str | None, dims: int, batch_size: int,
                  dev: torch.device, progress: bool) -> dict[str, Any]:
    n, d = len(store), feature_dim(store, layer, pool)
    gram = torch.zeros((d, d), dtype=torch.float64, device=dev)
    total = torch.zeros(d, dtype=torch.float64, device=dev)
    shift = None
    for _, x in _blocks(store, layer, pool, batch_size, dev, progress, f"PCA {layer}"):
        if shift is None:  # a fixed shift (the first block's mean) keeps the sums small
            shift = x.mean(dim=0)
        x = x - shift
        gram.addmm_(x.T, x)
        total += x.sum(dim=0)
    cov = (gram - torch.outer(total, total) / n) / (n - 1)
    cov = (cov + cov.T) / 2
    values, vectors = torch.linalg.eigh(cov)
    values = values.flip(0).clamp_(min=0.0)
    components = sign_convention(vectors.flip(1)[:, :dims].T.contiguous())
    mean = shift + total / n
    coords = torch.empty((n, dims), dtype=torch.float64, device=dev)
    for start, x in _blocks(store, layer, pool, batch_size, dev, progress, f"project {layer}"):
        coords[start:start + len(x)] = (x - mean) @ components.T
    total_var = float(torch.trace(cov).clamp(min=0.0))
    return {"coordinates": coords, "variance": values[:dims], "total": total_var,
            "components": components, "mean": mean}


def _pca_svd(x: torch.Tensor, dims: int) -> dict[str, Any]:
    n = x.shape[0]
    mean = x.mean(dim=0)
    xc = x - mean
    _, s, vt = torch.linalg.svd(xc, full_matrices=False)
    components = sign_convention(vt[:dims])
    variance = s * s / (n - 1)
    return {"coordinates": xc @ components.T, "variance": variance[:dims],
            "total": float((xc * xc).sum()) / (n - 1), "components": components, "mean": mean}


def _pca(store: Any, layer: str, pool: str | None, dims: int, batch_size: int,
         dev: torch.device, progress: bool) -> dict[str, Any]:
    d = feature_dim(store, layer, pool)
    if d <= STREAM_MAX_DIM:
        out = _pca_streamed(store, layer, pool, dims, batch_size, dev, progress)
    else:
        log.info("PCA of %s: %d features, computed by SVD of the rows in memory", layer, d)
        out = _pca_svd(load_features(store, layer, pool, batch_size, dev, progress), dims)
    if not out["total"] > 0:
        raise DissectError(f"layer {layer!r} has zero variance (every feature is constant): "
                           "no principal components")
    return out


def _tsne(x: np.ndarray, dims: int, seed: int, options: dict[str, Any]) -> np.ndarray:
    open_tsne = require("openTSNE", "openTSNE", "embed(method='tsne')")
    opts = {"n_jobs": 1, **options}
    if dims > 2:
        opts.setdefault("negative_gradient_method", "bh")  # openTSNE's FFT method: 1-2 dims
    if "perplexity" not in opts and len(x) <= 3 * 30:
        opts["perplexity"] = max(1.0, (len(x) - 1) / 3.0)  # openTSNE needs 3 * perplexity < N
        log.info("t-SNE on %d rows: perplexity lowered to %.1f", len(x), opts["perplexity"])
    tsne = open_tsne.TSNE(n_components=dims, random_state=seed, **opts)
    return np.asarray(tsne.fit(x), dtype=np.float64)


def _umap(x: np.ndarray, dims: int, seed: int, options: dict[str, Any]) -> np.ndarray:
    umap = require("umap", "umap-learn", "embed(method='umap')")
    opts = {"n_jobs": 1, **options}  # random_state makes umap single-threaded anyway
    reducer = umap.UMAP(n_components=dims, random_state=seed, **opts)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


METHODS: dict[str, Callable[[np.ndarray, int, int, dict[str, Any]], np.ndarray]] = {
    "tsne": _tsne,
    "umap": _umap,
}  # "pca" is computed here, streamed; these take the rows in memory
LIBRARIES = {"tsne": ("openTSNE", "openTSNE"), "umap": ("umap", "umap-learn")}


@store_paths("store")
def embed(
    store: Any,
    layer: str,
    *,
    method: str = "pca",
    dims: int = 2,
    pool: str | None = "mean",
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Embedding:
    """Place every row of one layer in ``dims`` dimensions.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`, or the path of one.
    layer
        One of its layers.
    method
        ``"pca"`` (exact, streamed: see the module docstring), ``"tsne"`` (openTSNE) or
        ``"umap"`` (umap-learn); the last two need the ``geometry`` extra.
    dims
        Dimensions of the embedding.
    pool
        How a ``(N, C, H, W)`` layer becomes ``(N, D)``: ``"mean"``, ``"flatten"`` or ``None``
        (refuse spatial layers).
    seed
        Random state of t-SNE / UMAP (PCA is deterministic).
    options
        Keyword arguments for ``openTSNE.TSNE`` or ``umap.UMAP`` (``perplexity``,
        ``n_neighbors``, ``n_jobs``, ...).
    batch_size
        Rows read per block.
    device
        Where PCA computes (default: CUDA when available, else the CPU).
    progress
        Show progress bars.

    Returns
    -------
    Embedding
        ``coordinates`` ``(N, dims)``; for PCA also ``explained_variance(_ratio)``,
        ``components`` and ``mean``.

    Raises
    ------
    DissectError
        For an unknown method, ``dims`` larger than the rows or features allow, a layer with
        zero variance, or a missing library (naming the ``geometry`` extra).

    Examples
    --------
    >>> emb = embed(store, "features.18")                            # doctest: +SKIP
    >>> emb.plot(labels=dataset.targets.numpy(), path="pca.png")     # doctest: +SKIP
    """
    if method != "pca" and method not in METHODS:
        raise DissectError(f"method must be one of 'pca', {', '.join(map(repr, METHODS))}; "
                           f"got {method!r}")
    pool = check_pool(pool)
    dims = positive_int(dims, "dims")
    batch_size = positive_int(batch_size, "batch_size")
    options = dict(options or {})
    if options and method == "pca":
        raise DissectError("options are for method='tsne' or 'umap'; PCA takes none")
    dev = resolve_device(device)
    d = feature_dim(store, layer, pool)
    n = len(store)
    warn_incomplete(store)
    if n < 2:
        raise DissectError(f"{store.path} has {n} row(s); an embedding needs at least 2")
    if dims > min(n, d):
        raise DissectError(f"dims={dims} is more than layer {layer!r} allows ({n} rows, {d} "
                           "features)")
    settings: dict[str, Any] = {"pool": pool, "seed": int(seed), "store": str(store.path),
                                "features": d, "rows": n, "options": options}
    if method != "pca":
        module, package = LIBRARIES[method]
        require(module, package, f"embed(method={method!r})")  # fail before reading rows
        x = load_features(store, layer, pool, batch_size, dev, progress).cpu().numpy()
        coords = METHODS[method](x, dims, int(seed), options)
        return Embedding(coords, method=method, layer=layer, index=store.index,
                         settings=settings)
    out = _pca(store, layer, pool, dims, batch_size, dev, progress)
    variance = out["variance"].cpu().numpy()
    return Embedding(out["coordinates"].cpu().numpy(), method="pca", layer=layer,
                     index=store.index, explained_variance=variance,
                     explained_variance_ratio=variance / out["total"],
                     components=out["components"].cpu().numpy(),
                     mean=out["mean"].cpu().numpy(), settings=settings)
