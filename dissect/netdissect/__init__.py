"""Network Dissection (Bau et al., CVPR 2017): exact unit-concept IoU scoring.

For every unit ``k`` of a layer and concept ``c`` of a :class:`~dissect.datasets.ConceptDataset`:

- ``T_k`` is the ``(1 - quantile)`` quantile of the finite raw activations of unit ``k`` over
  the dataset (every position of every image; NaN, ``+inf`` and ``-inf`` left out), equal to
  ``numpy.nanquantile(np.where(np.isfinite(values), values, np.nan), 1 - quantile)``
  (``numpy.quantile`` when all are finite): exact (:func:`dissect.stats.exact_quantiles`), not
  a sketch. A unit with no finite value has ``T_k = +inf``: never active, never a detector.
- Each map is upsampled to the segmentation size by bilinear interpolation
  (``align_corners=False``, ``F.interpolate``); active pixels are those whose upsampled value
  ``up`` is finite and ``> T_k`` (:func:`.active_pixels.active_pixels`, exact and sparse;
  :func:`.active_pixels.active_mask_dense` is the dense reference). A pixel whose interpolation
  reads a non-finite value is NaN or infinite there, so it is never active.
- Non-finite activations are counted while the thresholds are computed; :func:`dissect` logs
  one warning per affected layer (count, NaN/+inf/-inf, first rows, units without a finite
  value) and records the counts in ``DissectionResult.meta["nonfinite"]``.
- ``I[k, c]`` sums ``|active_k AND mask_c|``, ``A[k, cat]`` sums the active area over images on
  which category ``cat`` is annotated, ``L[c]`` the area of concept ``c``; an image-level label
  covers its whole image. ``IoU[k, c] = I / (A[k, cat(c)] + L[c] - I)`` with ``cat(c)`` the
  concept's primary category. A unit is a detector when its best IoU exceeds ``iou_threshold``.

Counts are exact integers (int64 tallies; float64 sums and matrix products of integers below
2**53). The intersections are counted per active row interval, not per pixel: each label row is
cut into runs of one concept and an interval adds its overlap with each run it touches.

Across processes (``torchrun``, :mod:`dissect.distributed`) each rank reads a contiguous shard
of the store's rows; the thresholds are merged exactly (:func:`dissect.stats.exact_quantiles`
with a collective) and the counts summed with an int64 all-reduce, so every rank returns the
same result as a single process, bit for bit.

Layout of this package
----------------------
- :mod:`.run`: :func:`dissect`, the thresholds and the pass over the annotations;
- :mod:`.tally`: :class:`IoUTally` (the exact counts of one layer) and its engine choice;
- :mod:`.active_pixels`: the active row intervals of upsampled maps, exact and sparse;
- :mod:`.label_runs`: label rows cut into runs of one concept (the ``"torch"`` engine);
- :mod:`.numba_engine`: the compiled one-pass-per-image counting kernel (the ``"numba"``
  engine, CPU);
- :mod:`.result`: :class:`UnitResult` and :class:`DissectionResult`;
- :mod:`.explain`: :func:`explain`, compositional explanations (Mu & Andreas, NeurIPS 2020):
  formulas of concepts (AND, OR, AND NOT) found by beam search with exact IoUs
  (:mod:`.explain_counts`, :mod:`.explain_search`, :mod:`.explain_result`);
- :mod:`.published`: :func:`read_netdissect_csv` (NetDissect / NetDissect-Lite result CSVs) and
  :func:`compare_results` (two dissections, unit by unit).
"""

from .explain import explain
from .explain_result import (
    Explanation,
    ExplanationResult,
    load_explanations,
    save_explanations,
)
from .published import Comparison, LayerComparison, compare_results, read_netdissect_csv
from .result import DissectionResult, UnitResult
from .run import dissect
from .tally import ENGINES, IoUTally

__all__ = ["ENGINES", "Comparison", "DissectionResult", "Explanation", "ExplanationResult",
           "IoUTally", "LayerComparison", "UnitResult", "compare_results", "dissect", "explain",
           "load_explanations", "read_netdissect_csv", "save_explanations"]
