"""Geometry measures across layers, as curves over depth (:class:`~.result.LayerCurve`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._plumbing.progress import progress_bar
from .._plumbing.store_layers import StoreLayers, store_layers
from ..similarity.features import store_paths
from .concentration import distance_concentration
from .intrinsic import MAX_ROWS, intrinsic_dimension
from .result import LayerCurve


def _curve(store: Any, layers: StoreLayers, measure: str, desc: str, progress: bool,
           settings: dict[str, Any], value: Callable[[str], float]) -> LayerCurve:
    """``value(layer)`` of every chosen layer of ``store``, as a :class:`LayerCurve`."""
    names = store_layers(store, layers, what="measure")
    values = [value(name) for name in progress_bar(iterable=names, desc=desc, enabled=progress,
                                                   unit="layer", outer=True)]
    return LayerCurve(measure, names, values, settings=settings)


@store_paths("store")
def intrinsic_dimension_curve(
    store: Any,
    layers: StoreLayers = None,
    *,
    method: str = "twonn",
    pool: str | None = "mean",
    max_rows: int | None = MAX_ROWS,
    discard_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LayerCurve:
    """:func:`~dissect.geometry.intrinsic_dimension` of every chosen layer (the same rows).

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`, or the path of one.
    layers
        ``None`` for all its layers, a name, a list or a predicate.
    method, pool, max_rows, discard_fraction, seed, batch_size, device
        As for :func:`~dissect.geometry.intrinsic_dimension`.
    progress
        Show a progress bar over the layers.

    Returns
    -------
    LayerCurve
        ``measure="intrinsic_dimension"``, ``.layers``, ``.values``.
    """
    settings = {"method": method, "pool": pool, "max_rows": max_rows, "rows": len(store),
                "discard_fraction": discard_fraction, "seed": seed, "store": str(store.path)}
    return _curve(store, layers, "intrinsic_dimension", "intrinsic dimension", progress,
                  settings, lambda name: intrinsic_dimension(
                      store, name, method=method, pool=pool, max_rows=max_rows,
                      discard_fraction=discard_fraction, seed=seed, batch_size=batch_size,
                      device=device, progress=False))


@store_paths("store")
def distance_concentration_curve(
    store: Any,
    layers: StoreLayers = None,
    *,
    queries: int = 100,
    metric: str = "euclidean",
    pool: str | None = "mean",
    seed: int = 0,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LayerCurve:
    """:func:`~dissect.geometry.distance_concentration` of every chosen layer (the same
    query rows).

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore`, or the path of one.
    layers
        ``None`` for all its layers, a name, a list or a predicate.
    queries, metric, pool, seed, batch_size, device
        As for :func:`~dissect.geometry.distance_concentration`.
    progress
        Show a progress bar over the layers.

    Returns
    -------
    LayerCurve
        ``measure="relative_contrast"``, ``.layers``, ``.values``.
    """
    settings = {"queries": queries, "metric": metric, "pool": pool, "rows": len(store),
                "seed": seed, "store": str(store.path)}
    return _curve(store, layers, "relative_contrast", "distance concentration", progress,
                  settings, lambda name: distance_concentration(
                      store, name, queries=queries, metric=metric, pool=pool, seed=seed,
                      batch_size=batch_size, device=device, progress=False))
