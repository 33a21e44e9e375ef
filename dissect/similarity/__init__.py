"""Layer similarity: linear CKA between layers and models, and exact nearest stored rows.

- :func:`cka`: linear CKA (Kornblith et al. 2019) of two in-memory representations, biased or
  debiased (the unbiased HSIC of Song et al. 2012, as in Nguyen et al. 2021);
- :func:`cka_matrix`: CKA between every pair of layers of one activation store, or of two
  stores captured on the same inputs (two models), streamed in one pass over the rows with
  memory independent of their number; a :class:`SimilarityResult`;
- :func:`nearest`: the exact ``k`` nearest stored rows of a layer for query rows or vectors
  (cosine or euclidean), streamed; :class:`NeighborSearch` is its engine for any row blocks.

Modules: :mod:`.features` (layer rows as feature vectors: pooling, blocks, the CountSketch),
:mod:`.linear_cka` (the estimators and their feature-space formulas), :mod:`.matrix` (the
streamed matrix), :mod:`.neighbors` (exact nearest rows), :mod:`.result`
(:class:`SimilarityResult`).
"""

from .linear_cka import cka
from .matrix import cka_matrix
from .neighbors import NeighborSearch, nearest
from .result import SimilarityResult

__all__ = ["NeighborSearch", "SimilarityResult", "cka", "cka_matrix", "nearest"]
