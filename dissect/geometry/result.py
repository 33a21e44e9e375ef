"""Results of the geometry measures: :class:`Embedding` (one layer's rows in few dimensions) and
:class:`LayerCurve` (one number per layer: intrinsic dimension, distance concentration)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from .._plumbing.arrays import decode_array, encode_array
from .._plumbing.figures import finish_figure, new_figure
from .._plumbing.result_files import read_json, result_path, write_json
from ..errors import DissectError

EMBEDDING_FORMAT = "torch-dissect-embedding"
CURVE_FORMAT = "torch-dissect-layer-curve"
VERSION = 1




def _optional(doc: dict[str, Any], key: str) -> np.ndarray | None:
    value = doc.get(key)
    return None if value is None else decode_array(value, key)


class Embedding:
    """The rows of one layer placed in a few dimensions (PCA, t-SNE or UMAP).

    Attributes
    ----------
    coordinates
        float64 ``(N, dims)``: row ``i`` is store row ``i``.
    method
        ``"pca"``, ``"tsne"`` or ``"umap"``.
    layer
        The layer embedded.
    index
        int64 ``(N,)``: the dataset item of each row (the store's ``/index``).
    explained_variance, explained_variance_ratio
        PCA only (else None): the variance along each component (``ddof=1``) and its share of
        the total variance.
    components, mean
        PCA only (else None): the principal axes ``(dims, D)`` (unit rows; the entry of largest
        magnitude of each is positive) and the mean ``(D,)``; ``(x - mean) @ components.T``
        places a new feature vector.
    settings
        How it was made (pool, seed, store, the library's options).
    """

    def __init__(self, coordinates: Any, *, method: str, layer: str, index: Any = None,
                 explained_variance: Any = None, explained_variance_ratio: Any = None,
                 components: Any = None, mean: Any = None,
                 settings: dict[str, Any] | None = None) -> None:
        self.coordinates = np.asarray(coordinates, dtype=np.float64)
        if self.coordinates.ndim != 2:
            raise DissectError(f"coordinates must be (N, dims), got {self.coordinates.shape}")
        self.method = str(method)
        self.layer = str(layer)
        n = len(self.coordinates)
        self.index = (np.arange(n, dtype=np.int64) if index is None
                      else np.asarray(index, dtype=np.int64))

        def opt(value: Any) -> np.ndarray | None:
            return None if value is None else np.asarray(value, dtype=np.float64)

        self.explained_variance = opt(explained_variance)
        self.explained_variance_ratio = opt(explained_variance_ratio)
        self.components = opt(components)
        self.mean = opt(mean)
        self.settings = dict(settings or {})

    @property
    def dims(self) -> int:
        """Dimensions of the embedding."""
        return int(self.coordinates.shape[1])

    def __len__(self) -> int:
        return len(self.coordinates)

    def __repr__(self) -> str:
        return (f"Embedding({self.method}, layer {self.layer!r}, {len(self)} rows x "
                f"{self.dims} dims)")

    def summary(self) -> str:
        """One paragraph: what was embedded, and PCA's explained variance."""
        s = self.settings
        lines = [f"{self.method.upper()} embedding of layer {self.layer!r}: {len(self)} rows, "
                 f"{s.get('features', '?')} features (pool={s.get('pool')}) -> {self.dims} dims"]
        if self.explained_variance_ratio is not None:
            shares = ", ".join(f"{100 * v:.1f}%" for v in self.explained_variance_ratio)
            lines.append(f"explained variance per component: {shares} (total "
                         f"{100 * float(self.explained_variance_ratio.sum()):.1f}%)")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> Path:
        """Everything as one JSON file (arrays exact); a folder receives ``embedding.json``."""
        def enc(a: np.ndarray | None) -> Any:
            return None if a is None else encode_array(a)

        doc = {"format": EMBEDDING_FORMAT, "version": VERSION, "method": self.method,
               "layer": self.layer, "coordinates": enc(self.coordinates),
               "index": enc(self.index), "explained_variance": enc(self.explained_variance),
               "explained_variance_ratio": enc(self.explained_variance_ratio),
               "components": enc(self.components), "mean": enc(self.mean),
               "settings": self.settings}
        return write_json(result_path(path, "embedding.json"), doc)

    @classmethod
    def from_json(cls, path: str | Path) -> Embedding:
        """Load an embedding written by :meth:`to_json`."""
        path = result_path(path, "embedding.json")
        doc = read_json(path, EMBEDDING_FORMAT, VERSION, "embedding")
        try:
            return cls(decode_array(doc["coordinates"], "coordinates"), method=doc["method"],
                       layer=doc["layer"], index=_optional(doc, "index"),
                       explained_variance=_optional(doc, "explained_variance"),
                       explained_variance_ratio=_optional(doc, "explained_variance_ratio"),
                       components=_optional(doc, "components"), mean=_optional(doc, "mean"),
                       settings=doc.get("settings") or {})
        except (KeyError, TypeError) as exc:
            raise DissectError(f"{path} is a damaged embedding: {exc!r}") from exc

    def plot(self, labels: Any = None, path: str | Path | None = None, *,
             title: str | None = None, names: Any = None) -> Any:
        """Scatter the rows on the first two dimensions (one dimension: against row number).

        Parameters
        ----------
        labels
            One value per row (``N``), coloring the points: integers or strings are classes
            (a legend, up to 20), floats a color scale. ``None``: one color.
        path
            Where to write the image (an existing folder receives ``embedding.png``).
            ``None``: return the figure.
        title
            The title (default: method and layer).
        names
            Class names for integer labels (``names[label]`` in the legend).

        Returns
        -------
        matplotlib.figure.Figure or pathlib.Path
        """
        xy = self.coordinates
        if self.dims == 1:
            xy = np.column_stack([np.arange(len(xy)), xy[:, 0]])
        fig = new_figure((6.4, 5.2))
        ax = fig.add_subplot(1, 1, 1)
        size = max(2.0, min(20.0, 4000.0 / max(1, len(xy))))
        if labels is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.8, linewidths=0)
        else:
            lab = np.asarray(labels)
            if lab.shape != (len(xy),):
                raise DissectError(f"labels must have one entry per row ({len(xy)}), got shape "
                                   f"{lab.shape}")
            if np.issubdtype(lab.dtype, np.floating):
                image = ax.scatter(xy[:, 0], xy[:, 1], c=lab, s=size, cmap="viridis",
                                   linewidths=0)
                fig.colorbar(image, ax=ax)
            else:
                classes = list(dict.fromkeys(lab.tolist()))
                import matplotlib

                cmap = matplotlib.colormaps["tab20" if len(classes) > 10 else "tab10"]
                for j, c in enumerate(classes):
                    sel = lab == c
                    name = names[c] if names is not None and isinstance(c, int) else c
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(j % cmap.N),
                               label=str(name) if j < 20 else None, linewidths=0)
                if len(classes) <= 20:
                    ax.legend(fontsize=7, markerscale=2, loc="best")
        prefix = {"pca": "PC", "tsne": "t-SNE ", "umap": "UMAP "}.get(self.method, "dim ")
        if self.dims == 1:
            ax.set_xlabel("row")
            ax.set_ylabel(f"{prefix}1")
        else:
            ax.set_xlabel(f"{prefix}1")
            ax.set_ylabel(f"{prefix}2")
        if self.explained_variance_ratio is not None and self.dims >= 2:
            r = self.explained_variance_ratio
            ax.set_xlabel(f"PC1 ({100 * r[0]:.1f}%)")
            ax.set_ylabel(f"PC2 ({100 * r[1]:.1f}%)")
        ax.set_title(title or f"{self.method.upper()} of {self.layer}", fontsize=10)
        return finish_figure(fig, path, "embedding.png")


MEASURES = {
    "intrinsic_dimension": "intrinsic dimension (TwoNN)",
    "relative_contrast": "relative contrast (d_max - d_min) / d_min",
}


class LayerCurve:
    """One number per layer, in layer order: a curve over depth.

    Attributes
    ----------
    measure
        ``"intrinsic_dimension"`` or ``"relative_contrast"``.
    layers
        Layer names.
    values
        float64 ``(len(layers),)``.
    settings
        How it was computed.
    """

    def __init__(self, measure: str, layers: list[str], values: Any, *,
                 settings: dict[str, Any] | None = None) -> None:
        self.measure = str(measure)
        self.layers = [str(n) for n in layers]
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.shape != (len(self.layers),):
            raise DissectError(f"{len(self.layers)} layers but values of shape "
                               f"{self.values.shape}")
        self.settings = dict(settings or {})

    def __getitem__(self, layer: str) -> float:
        if layer not in self.layers:
            raise DissectError(f"layer {layer!r} is not in this curve; layers: {self.layers}")
        return float(self.values[self.layers.index(layer)])

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"LayerCurve({self.measure}, {len(self)} layers)"

    @property
    def label(self) -> str:
        """A readable name of the measure."""
        return MEASURES.get(self.measure, self.measure)

    def summary(self) -> str:
        """The curve as a two-column table."""
        width = max([5] + [len(n) for n in self.layers])
        s = self.settings
        lines = [f"{self.label} per layer (pool={s.get('pool')}, rows={s.get('rows')})",
                 f"{'layer':<{width}} {'value':>10}"]
        lines += [f"{n:<{width}} {v:10.3f}" for n, v in zip(self.layers, self.values,
                                                             strict=True)]
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """``layer,value`` rows; a folder receives ``<measure>.csv``."""
        path = result_path(path, f"{self.measure}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["layer", self.measure])
            for n, v in zip(self.layers, self.values, strict=True):
                w.writerow([n, "" if math.isnan(v) else repr(float(v))])
        return path

    def to_json(self, path: str | Path) -> Path:
        """One JSON file (values exact); a folder receives ``<measure>.json``."""
        doc = {"format": CURVE_FORMAT, "version": VERSION, "measure": self.measure,
               "layers": self.layers, "values": encode_array(self.values),
               "settings": self.settings}
        return write_json(result_path(path, f"{self.measure}.json"), doc)

    @classmethod
    def from_json(cls, path: str | Path) -> LayerCurve:
        """Load a curve written by :meth:`to_json` (a file path)."""
        doc = read_json(path, CURVE_FORMAT, VERSION, "layer curve")
        try:
            return cls(doc["measure"], list(doc["layers"]), decode_array(doc["values"], "values"),
                       settings=doc.get("settings") or {})
        except (KeyError, TypeError) as exc:
            raise DissectError(f"{path} is a damaged layer curve: {exc!r}") from exc

    def plot(self, path: str | Path | None = None, *, title: str | None = None) -> Any:
        """The value against layer depth. ``path``: write there (a folder receives
        ``<measure>.png``); ``None``: return the figure."""
        fig = new_figure((max(5.0, 0.4 * len(self.layers) + 2.5), 3.8))
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(self.layers))
        ax.plot(x, self.values, "o-", color="tab:blue")
        ax.set_xticks(x)
        rotate = len(x) > 4
        ax.set_xticklabels(self.layers, rotation=45 if rotate else 0,
                           ha="right" if rotate else "center", fontsize=8)
        ax.set_xlabel("layer (depth)")
        ax.set_ylabel(self.label)
        ax.grid(alpha=0.3)
        ax.set_title(title or f"{self.label} (pool={self.settings.get('pool')})", fontsize=10)
        return finish_figure(fig, path, f"{self.measure}.png")
