"""Representation geometry of a layer's rows: embeddings, intrinsic dimension, concentration.

- :func:`embed`: the rows of one layer in a few dimensions: PCA (exact, streamed), t-SNE
  (openTSNE) or UMAP (umap-learn); an :class:`Embedding` with ``plot(labels=...)``;
- :func:`intrinsic_dimension`: TwoNN (Facco et al. 2017), scikit-dimension's variant, on exact
  nearest-neighbour distances;
- :func:`distance_concentration`: the mean relative contrast ``(d_max - d_min) / d_min`` of
  random query rows (how much nearest neighbours still mean);
- :func:`intrinsic_dimension_curve`, :func:`distance_concentration_curve`: either across
  layers, a :class:`LayerCurve` (``.layers``, ``.values``, ``plot()``);
- :func:`write_layer_results`: CKA and all of the above for a store, written into a results
  folder's ``layers/`` for the report's Layers page (``dissect similarity``, ``dissect demo``).

t-SNE and UMAP need the ``geometry`` extra: ``pip install 'torch-dissect[geometry]'``.

Modules: :mod:`.embedding`, :mod:`.intrinsic`, :mod:`.concentration`, :mod:`.curves`,
:mod:`.result` (:class:`Embedding`, :class:`LayerCurve`), :mod:`.layer_results`.
"""

from .concentration import distance_concentration
from .curves import distance_concentration_curve, intrinsic_dimension_curve
from .embedding import embed
from .intrinsic import intrinsic_dimension, twonn_fit
from .layer_results import LayerResults, write_layer_results
from .result import Embedding, LayerCurve

__all__ = [
    "Embedding",
    "LayerCurve",
    "LayerResults",
    "distance_concentration",
    "distance_concentration_curve",
    "embed",
    "intrinsic_dimension",
    "intrinsic_dimension_curve",
    "twonn_fit",
    "write_layer_results",
]
