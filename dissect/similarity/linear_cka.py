"""Linear CKA (Kornblith et al. 2019) of two representations of the same rows, biased or not.

For features ``X (N, D1)`` and ``Y (N, D2)`` of the same ``N`` inputs, with centred columns::

    CKA(X, Y) = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)),   HSIC(X, Y) ~ |Yc^T Xc|_F^2

The **debiased** form (Nguyen et al. 2021) replaces HSIC by the unbiased estimator of Song et
al. 2012 on the Gram matrices ``K = X X^T``, ``L = Y Y^T`` with zeroed diagonals ``K~, L~``::

    HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((N-1)(N-2)) - 2/(N-2) 1'K~L~1] / (N (N-3))

**In feature space** (no ``N x N`` matrix), with row norms ``a_i = |x_i|^2``, ``b_i = |y_i|^2``,
column sums ``s_x = X^T 1``, ``s_y = Y^T 1`` and ``C = X^T Y``: ``sum_ij K_ij L_ij = |C|_F^2``,
``(K 1)_i = x_i . s_x`` and ``1' K 1 = |s_x|^2``; taking the diagonals out,

- ``tr(K~ L~) = |C|_F^2 - sum_i a_i b_i``
- ``1'K~1 = |s_x|^2 - sum_i a_i`` (and the same for ``L``)
- ``1'K~L~1 = sum_i (x_i . s_x - a_i)(y_i . s_y - b_i)
  = s_x^T C s_y - (X^T b) . s_x - (Y^T a) . s_y + sum_i a_i b_i``

so the estimator needs only ``C``, the column sums, ``X^T b``, ``Y^T a``, ``sum a``, ``sum b``
and ``sum_i a_i b_i``: sums over rows that a stream accumulates (:class:`PairMoments`). The
estimator is invariant to shifting either representation (it is a U-statistic of differences
``x_i - x_j``), so any fixed shift may be subtracted first for accuracy.

:func:`cka` computes it for in-memory arrays, in feature space or with Gram matrices, whichever
is cheaper; :func:`dissect.similarity.cka_matrix` streams the same moments from a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DissectError


@dataclass
class PairMoments:
    """Row sums of two representations ``X (N, Du)``, ``Y (N, Dv)`` that CKA needs.

    Attributes
    ----------
    n
        Rows.
    cross
        ``X^T Y`` ``(Du, Dv)``.
    sum_x, sum_y
        Column sums ``X^T 1``, ``Y^T 1``.
    norms_x, norms_y
        ``sum_i |x_i|^2`` and ``sum_i |y_i|^2``.
    norms_xy
        ``sum_i |x_i|^2 |y_i|^2``.
    x_by_norms_y
        ``X^T b`` (``sum_i |y_i|^2 x_i``), ``(Du,)``; only for the debiased form.
    y_by_norms_x
        ``Y^T a`` (``sum_i |x_i|^2 y_i``), ``(Dv,)``; only for the debiased form.
    """

    n: int
    cross: torch.Tensor
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    norms_x: float
    norms_y: float
    norms_xy: float = 0.0
    x_by_norms_y: torch.Tensor | None = None
    y_by_norms_x: torch.Tensor | None = None


def biased_hsic(m: PairMoments) -> float:
    """``|Yc^T Xc|_F^2`` from moments (HSIC times ``(N-1)^2``; the factor cancels in CKA)."""
    centred = m.cross - torch.outer(m.sum_x, m.sum_y) / m.n
    return float((centred * centred).sum())


def unbiased_hsic(m: PairMoments) -> float:
    """The unbiased HSIC estimator (Song et al. 2012) from moments (module docstring)."""
    n = m.n
    if n < 4:
        raise DissectError(f"the debiased CKA needs at least 4 rows, got {n}")
    if m.x_by_norms_y is None or m.y_by_norms_x is None:
        raise DissectError("these moments were accumulated without the debiased sums")
    trace = float((m.cross * m.cross).sum()) - m.norms_xy
    sum_k = float(m.sum_x @ m.sum_x) - m.norms_x
    sum_l = float(m.sum_y @ m.sum_y) - m.norms_y
    middle = (float(m.sum_x @ (m.cross @ m.sum_y)) - float(m.x_by_norms_y @ m.sum_x)
              - float(m.y_by_norms_x @ m.sum_y) + m.norms_xy)
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * middle / (n - 2)) / (n * (n - 3))


def hsic(m: PairMoments, debiased: bool) -> float:
    """:func:`unbiased_hsic` when ``debiased``, else :func:`biased_hsic`."""
    return unbiased_hsic(m) if debiased else biased_hsic(m)


def cka_from_hsic(xy: float, xx: float, yy: float, debiased: bool,
                  names: tuple[str, str] = ("x", "y")) -> float:
    """``xy / sqrt(xx yy)``, refusing a representation with no (estimated) variance."""
    for value, name in ((xx, names[0]), (yy, names[1])):
        if not value > 0:
            what = "unbiased HSIC" if debiased else "variance"
            raise DissectError(
                f"{name} has zero {what} (HSIC({name}, {name}) = {value:.3g}): CKA is undefined"
                + (" (constant features, or too few rows for the debiased estimator)"
                   if debiased else " (every feature is constant over the rows)"))
    return float(xy / np.sqrt(xx * yy))


def as_features(x: Any, name: str) -> torch.Tensor:
    """A 2-D float64 tensor ``(N, D)`` from an array or tensor (its device kept)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DissectError(f"{name} must be an array or tensor (N, D): {exc}") from exc
    if t.ndim != 2:
        raise DissectError(f"{name} must be 2-D, (rows, features), got shape {tuple(t.shape)}; "
                           "reshape it (x.reshape(len(x), -1)) or pool it first")
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)):
        raise DissectError(f"{name} must hold real numbers, got {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise DissectError(f"{name} holds NaN or infinite values: CKA is undefined")
    return t


def _check_constant(t: torch.Tensor, name: str) -> None:
    if t.shape[1] == 0 or bool((t.amax(dim=0) == t.amin(dim=0)).all()):
        raise DissectError(f"{name} has zero variance (every feature is constant over the "
                           "rows): CKA is undefined")


def feature_moments(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> PairMoments:
    """:class:`PairMoments` of in-memory features (centred first, for accuracy)."""
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    a = (x * x).sum(dim=1)
    b = (y * y).sum(dim=1)
    m = PairMoments(n=x.shape[0], cross=x.T @ y, sum_x=x.sum(dim=0), sum_y=y.sum(dim=0),
                    norms_x=float(a.sum()), norms_y=float(b.sum()))
    if debiased:
        m.norms_xy = float(a @ b)
        m.x_by_norms_y = x.T @ b
        m.y_by_norms_x = y.T @ a
    return m


def gram_hsic(k: torch.Tensor, ell: torch.Tensor, debiased: bool) -> float:
    """HSIC from Gram matrices of centred features (the same scale as :func:`hsic`)."""
    if not debiased:
        return float((k * ell).sum())
    n = k.shape[0]
    k = k.clone()
    ell = ell.clone()
    k.fill_diagonal_(0)
    ell.fill_diagonal_(0)
    kl_rows = k @ ell.sum(dim=1)
    trace = float((k * ell).sum())
    return (trace + float(k.sum()) * float(ell.sum()) / ((n - 1) * (n - 2))
            - 2.0 * float(kl_rows.sum()) / (n - 2)) / (n * (n - 3))


def cka(x: Any, y: Any, *, debiased: bool = False) -> float:
    """Linear CKA of two representations of the same rows.

    Parameters
    ----------
    x, y
        Arrays or tensors ``(N, D1)`` and ``(N, D2)``: row ``i`` of both describes input ``i``.
        Computed in float64 on the tensors' device (the CPU for numpy arrays).
    debiased
        Use the unbiased HSIC estimator (Song et al. 2012), as in Nguyen et al. 2021: near 0
        for independent representations whatever ``N / D`` (the biased form is about
        ``D / (N + D)`` there). May be slightly negative.

    Returns
    -------
    float
        1 for representations equal up to an orthogonal map, isotropic scaling and shifts.

    Raises
    ------
    DissectError
        When the row counts differ, for fewer than 2 rows (4 with ``debiased``), for
        non-finite values, and when a representation has zero variance.

    Notes
    -----
    Exact in float64. Computed in feature space (``D x D`` products, see the module docstring)
    when that is cheaper than the ``N x N`` Gram matrices, else with the Gram matrices.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(100, 8))
    >>> round(cka(x, 3 * x @ np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0]), 6)
    1.0
    """
    xt = as_features(x, "x")
    yt = as_features(y, "y").to(xt.device)
    n = xt.shape[0]
    if yt.shape[0] != n:
        raise DissectError(f"x and y must describe the same rows: x has {n} rows, y has "
                           f"{yt.shape[0]}")
    need = 4 if debiased else 2
    if n < need:
        raise DissectError(f"CKA needs at least {need} rows{' (debiased)' if debiased else ''}, "
                           f"got {n}")
    _check_constant(xt, "x")
    _check_constant(yt, "y")
    d1, d2 = xt.shape[1], yt.shape[1]
    if d1 * d1 + d2 * d2 + d1 * d2 <= n * (d1 + d2):  # feature space is cheaper
        mxy = feature_moments(xt, yt, debiased)
        mxx = feature_moments(xt, xt, debiased)
        myy = feature_moments(yt, yt, debiased)
        return cka_from_hsic(hsic(mxy, debiased), hsic(mxx, debiased), hsic(myy, debiased),
                             debiased)
    xc = xt - xt.mean(dim=0)
    yc = yt - yt.mean(dim=0)
    k = xc @ xc.T
    ell = yc @ yc.T
    return cka_from_hsic(gram_hsic(k, ell, debiased), gram_hsic(k, k, debiased),
                         gram_hsic(ell, ell, debiased), debiased)
