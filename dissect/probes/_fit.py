"""Many multinomial logistic regressions fitted at once: batched L-BFGS on padded layer blocks.

Problem ``(l, v)`` is the probe of layer ``l`` in variant ``v`` (a regularization strength of the
validation grid, or the real / control labels). It minimizes

    F(W, b) = mean_i CE(softmax(x_i W + b), y_i) + reg / 2 * ||W||_F^2        (bias unpenalized)

which is scikit-learn's ``LogisticRegression`` objective (lbfgs) with ``C = 1 / (reg * n)``.

Layout. Layers of similar width form a :class:`Block` whose features are one ``(G, N, w)``
tensor: column 0 is the constant 1 (the bias), columns ``1..D_l`` the layer's features, the rest
zero padding. All parameters live in one ``(R, V, C)`` tensor: block after block, layer after layer,
``w`` rows each (row 0 the bias). Padded rows see zero features, start at zero and so stay zero.
One objective evaluation is one ``bmm`` per block for every layer and variant of the block.

Optimizer. The problems are independent, so one *joint* L-BFGS on the sum would let the worst
conditioned problem set everyone's step. Instead every vector operation of L-BFGS is batched but
every scalar is per problem: each problem has its own history pairs (``rho``), scaling ``gamma``,
Armijo backtracking step ``t`` (quadratic interpolation) and stopping test (``max |grad| <= tol``,
scipy's ``pgtol``, the criterion scikit-learn uses). A problem that has converged stops moving; a
block whose problems have all stopped is no longer evaluated. The result equals separate runs.

Preconditioning. The initial inverse Hessian of the two-loop recursion is diagonal,
``gamma / (var_j * curv_c + reg)`` for the weight of feature ``j`` and class ``c``: ``var_j`` the
feature's training variance, ``curv_c = mean_i p_ic (1 - p_ic)`` the softmax curvature at the
current iterate: the Hessian's diagonal when features are uncorrelated and their magnitudes
independent of the predictions. :mod:`~dissect.probes._data` decorrelates narrow layers by
rotating them to their principal axes (a rotation changes neither predictions nor the L2
penalty). On correlated CNN features this cuts iterations several-fold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .._plumbing.progress import progress_bar

log = logging.getLogger(__name__)

#: elements of the logits buffer ``(G, rows, V, C)`` per evaluated chunk (bounds its memory)
LOGIT_ELEMENTS = 1 << 22


@dataclass
class Block:
    """Layers of similar width whose probes are evaluated by one batched matmul.

    Attributes
    ----------
    layers
        Positions of the block's layers in the probed layer list (rows of ``(L, V)`` tables).
    width
        Columns per layer: 1 (bias) + padded feature count.
    x
        ``(G, N, width)`` features on the device, rows in split order; ``None`` when the block
        is read from ``arrays`` (out of core).
    arrays
        Out of core: one ``(N, width)`` array (a ``numpy.memmap``) per layer, read in row chunks
        at every evaluation.
    chunk_rows
        Rows per chunk read from ``arrays``.
    """

    layers: list[int]
    width: int
    x: torch.Tensor | None = None
    arrays: list[np.ndarray] = field(default_factory=list)
    chunk_rows: int = 4096

    @property
    def size(self) -> int:
        """Number of layers ``G``."""
        return len(self.layers)

    def chunks(
        self, lo: int, hi: int, n_out: int, device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first row, (G, b, width) features)`` covering rows ``lo:hi``."""
        step = max(1, LOGIT_ELEMENTS // max(1, self.size * n_out))
        if self.x is not None:
            for s in range(lo, hi, step):
                yield s, self.x[:, s : min(hi, s + step)]
            return
        step = min(step, self.chunk_rows)
        for s in range(lo, hi, step):
            e = min(hi, s + step)
            parts = [torch.from_numpy(np.ascontiguousarray(a[s:e])) for a in self.arrays]
            yield s, torch.stack(parts).to(device=device, dtype=dtype, non_blocking=True)


@dataclass
class FitInfo:
    """Per-problem outcome of :meth:`BatchedSoftmax.fit` (``(L, V)`` arrays)."""

    iterations: np.ndarray
    converged: np.ndarray
    grad_max: np.ndarray
    mask: torch.Tensor | None = None  # (V, C, 1) logit offsets: -inf for unseen classes


def class_mask(y: torch.Tensor, n: int, n_classes: int) -> torch.Tensor | None:
    """``(V, C, 1)`` logit offsets, ``-inf`` where class ``c`` is absent from ``y[:n, v]``."""
    seen = torch.zeros(y.shape[1], n_classes, dtype=torch.bool, device=y.device)
    seen.scatter_(1, y[:n].T, True)
    if bool(seen.all()):
        return None
    zero = torch.zeros((), device=y.device)
    return torch.where(seen, zero, torch.full_like(zero, float("-inf")))[..., None]


class BatchedSoftmax:
    """Fit and evaluate ``L x V`` independent L2-regularized softmax regressions together.

    Parameters
    ----------
    blocks
        The feature blocks (every layer in exactly one).
    n_layers
        ``L``.
    n_classes
        ``C``.
    device, dtype
        Where and in which precision features and parameters live (losses accumulate in
        float64).
    variances
        Per layer, the training variance of each feature (column 1 onwards): the diagonal
        preconditioner of L-BFGS is ``1 / (variance / C + reg)`` per weight, exact when the
        features are uncorrelated (rotated to their principal axes) and the softmax curvature
        is that of uniform predictions. ``None``: unit variances.
    """

    def __init__(
        self,
        blocks: list[Block],
        n_layers: int,
        n_classes: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        variances: list[np.ndarray] | None = None,
    ) -> None:
        self.blocks, self.n_layers, self.n_classes = blocks, n_layers, n_classes
        self.device, self.dtype = device, dtype
        offsets, row_layer, penalized, var = [], [], [], []
        r = 0
        for b in blocks:
            offsets.append(r)
            for layer in b.layers:
                row_layer += [layer] * b.width
                penalized += [0.0] + [1.0] * (b.width - 1)
                v = np.ones(b.width - 1) if variances is None else np.asarray(variances[layer])
                var += [1.0] + v.tolist() + [0.0] * (b.width - 1 - len(v))
            r += b.size * b.width
        self.variances = torch.tensor(var, dtype=torch.float64, device=device)
        self.offsets, self.n_rows = offsets, r
        self.row_layer = torch.tensor(row_layer, dtype=torch.long, device=device)
        self.penalized = torch.tensor(penalized, dtype=dtype, device=device)[:, None, None]
        self._block_layers = [torch.tensor(b.layers, device=device) for b in blocks]
        self._minus_one = torch.tensor(-1.0, dtype=dtype, device=device)

    # ------------------------------------------------------------------ per-problem reductions

    def _view(self, theta: torch.Tensor, i: int) -> torch.Tensor:
        b, off = self.blocks[i], self.offsets[i]
        return theta[off : off + b.size * b.width].view(b.size, b.width, *theta.shape[1:])

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-problem inner products of two ``(R, V, C)`` tensors: ``(L, V)`` float64."""
        n_var, c = a.shape[1:]
        # sum the rows per layer first (index_add over the long axis), the classes last:
        # several times faster than reducing the short class axis of every row
        prod = (a * b).view(-1, n_var * c)
        out = torch.zeros(self.n_layers, n_var * c, dtype=prod.dtype, device=a.device)
        out.index_add_(0, self.row_layer, prod)
        return out.view(self.n_layers, n_var, c).sum(-1, dtype=torch.float64)

    def abs_max(self, a: torch.Tensor) -> torch.Tensor:
        """Per-problem ``max |a|`` of an ``(R, V, C)`` tensor: ``(L, V)`` float64."""
        out = torch.zeros(self.n_layers, a.shape[1], dtype=torch.float64, device=a.device)
        for i, layers in enumerate(self._block_layers):
            out[layers] = self._view(a, i).abs().amax((1, 3)).double()
        return out

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Broadcast an ``(L, V)`` table to ``(R, V, 1)`` in the parameter dtype."""
        return s.to(self.dtype)[self.row_layer][..., None]

    # ------------------------------------------------------------------ objective

    def value_grad(
        self,
        theta: torch.Tensor,
        y: torch.Tensor,
        n: int,
        reg: torch.Tensor,
        f: torch.Tensor,
        g: torch.Tensor,
        skip: list[bool] | None = None,
        curv: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Objective and gradient of every problem on rows ``0:n``, written into ``f``, ``g``.

        ``theta`` is ``(R, V, C)``, ``y`` ``(N, V)`` int64 labels, ``reg`` ``(L, V)``. Blocks
        with ``skip[i]`` keep their previous values in ``f``, ``g`` (and ``curv``). ``curv``
        ``(L, V, C)`` receives ``mean_i p_ic (1 - p_ic)``: the softmax curvature per class.
        ``mask`` ``(V, C, 1)`` is added to the logits (``-inf`` for classes a variant never saw
        in training, as scikit-learn knows only the classes of its training labels).
        """
        v, c = theta.shape[1:]
        for i, blk in enumerate(self.blocks):
            if skip is not None and skip[i]:
                continue
            th = self._view(theta, i)
            # class-major products (VC x width) @ (width x rows): the long axis is the output's
            # contiguous one, several times faster on CPUs than (rows x width) @ (width x VC)
            wt = th.reshape(blk.size, blk.width, v * c).transpose(1, 2).contiguous()
            fb = cb = gt = None
            for s, xc in blk.chunks(0, n, v * c, self.device, self.dtype):
                rows = xc.shape[1]
                z = torch.bmm(wt, xc.transpose(1, 2)).view(blk.size, v, c, rows)
                if mask is not None:
                    z += mask
                lse = torch.logsumexp(z, 2, keepdim=True)
                yc = y[s : s + rows].T.expand(blk.size, v, rows)[:, :, None]  # (G, V, 1, b)
                part = (lse - z.gather(2, yc)).sum((2, 3), dtype=torch.float64)
                fb = part if fb is None else fb + part
                p = z.sub_(lse).exp_()
                if curv is not None:
                    part = (p - p * p).sum(3, dtype=torch.float64)
                    cb = part if cb is None else cb + part
                p.scatter_add_(2, yc, self._minus_one.expand(yc.shape))
                if gt is None:
                    gt = torch.bmm(p.view(blk.size, v * c, rows), xc)
                else:
                    gt.baddbmm_(p.view(blk.size, v * c, rows), xc)
            if gt is None:  # no rows
                fb = torch.zeros(blk.size, v, dtype=torch.float64, device=self.device)
                cb = torch.zeros(blk.size, v, c, dtype=torch.float64, device=self.device)
                gt = torch.zeros(blk.size, v * c, blk.width, dtype=self.dtype, device=self.device)
            gb = gt.transpose(1, 2).reshape(th.shape).div_(max(n, 1))
            weights = th[:, 1:]
            rb = reg[self._block_layers[i]]  # (G, V)
            gb[:, 1:].addcmul_(rb.to(self.dtype)[:, None, :, None], weights)
            fb = fb / max(n, 1) + 0.5 * rb * (weights * weights).sum((1, 3), dtype=torch.float64)
            f[self._block_layers[i]] = fb
            if curv is not None:
                curv[self._block_layers[i]] = cb / max(n, 1)
            self._view(g, i).copy_(gb)

    # ------------------------------------------------------------------ L-BFGS

    def direction(
        self,
        g: torch.Tensor,
        h0: torch.Tensor,
        s_hist: torch.Tensor,
        y_hist: torch.Tensor,
        rho: torch.Tensor,
        stored: int,
    ) -> torch.Tensor:
        """The L-BFGS direction ``-H g`` of every problem (two-loop recursion, batched).

        ``h0`` ``(R, V, C)`` is the diagonal initial inverse Hessian, ``s_hist``/``y_hist``
        ``(m, R, V, C)`` the ring buffer of pairs (``stored`` written so far) and ``rho``
        ``(m, L, V)`` their ``1 / s.y`` per problem, 0 where a problem skipped the pair.
        """
        m = s_hist.shape[0]
        q = -g
        order = [(stored - 1 - j) % m for j in range(min(stored, m))]  # newest first
        alphas = {}
        for k in order:
            alphas[k] = rho[k] * self.dot(s_hist[k], q)
            q.addcmul_(self.expand(alphas[k]), y_hist[k], value=-1.0)
        d = q.mul_(h0)
        for k in reversed(order):
            beta = rho[k] * self.dot(y_hist[k], d)
            d.addcmul_(self.expand(alphas[k] - beta), s_hist[k])
        return d

    def fit(
        self,
        y: torch.Tensor,
        n: int,
        reg: torch.Tensor,
        *,
        x0: torch.Tensor | None = None,
        tol: float = 1e-4,
        max_iter: int = 1000,
        history: int = 10,
        max_ls: int = 30,
        progress: bool = False,
        desc: str = "fit",
    ) -> tuple[torch.Tensor, FitInfo]:
        """Minimize every problem's objective on rows ``0:n`` with batched L-BFGS.

        Parameters
        ----------
        y
            ``(N, V)`` int64 labels on the device (only rows ``0:n`` are used).
        n
            Number of training rows (the leading rows of every block).
        reg
            ``(L, V)`` float64 L2 strengths (> 0).
        x0
            Starting parameters ``(R, V, C)`` (zeros by default).
        tol
            A problem has converged when ``max |grad| <= tol``.
        max_iter
            Iterations at most (per problem; they run in lockstep).
        history
            L-BFGS memory (pairs kept).
        max_ls
            Backtracking steps at most per line search.
        progress
            Show a tqdm bar of iterations.
        desc
            The bar's label.

        Returns
        -------
        theta : torch.Tensor
            ``(R, V, C)`` fitted parameters.
        info : FitInfo
        """
        dev = self.device
        n_var, c = y.shape[1], self.n_classes
        shape = (self.n_rows, n_var, c)
        x = torch.zeros(shape, dtype=self.dtype, device=dev) if x0 is None else x0.clone()
        f = torch.zeros(self.n_layers, n_var, dtype=torch.float64, device=dev)
        g = torch.zeros(shape, dtype=self.dtype, device=dev)
        curv = torch.zeros(self.n_layers, n_var, c, dtype=torch.float64, device=dev)
        mask = class_mask(y, n, c)
        self.value_grad(x, y, n, reg, f, g, curv=curv, mask=mask)
        penalty = reg[self.row_layer] * self.penalized[:, :, 0].double()  # (R, V)
        gmax = self.abs_max(g)
        active = gmax > tol
        iters = torch.zeros(self.n_layers, n_var, dtype=torch.long, device=dev)
        m = max(1, history)
        s_hist = torch.zeros((m, *shape), dtype=self.dtype, device=dev)
        y_hist = torch.zeros((m, *shape), dtype=self.dtype, device=dev)
        rho = torch.zeros(m, self.n_layers, n_var, dtype=torch.float64, device=dev)
        stored = 0
        gamma = torch.ones(self.n_layers, n_var, dtype=torch.float64, device=dev)
        f_new, g_new, curv_new = f.clone(), g.clone(), curv.clone()
        bar = progress_bar(max_iter, desc, progress, unit="it")
        try:
            for _ in range(max_iter):
                if not bool(active.any()):
                    break
                # diagonal initial inverse Hessian per weight: 1 / (var_j * curv_c + reg), the
                # exact diagonal for uncorrelated features, refreshed at every iterate
                hess = self.variances[:, None, None] * curv[self.row_layer] + penalty[..., None]
                h0 = (1.0 / hess.clamp(min=1e-12)).to(self.dtype)
                hg = h0 * self.expand(gamma)  # H0 = gamma * diag(h0)
                d = self.direction(g, hg, s_hist, y_hist, rho, stored)
                d *= self.expand(active)
                gtd = self.dot(g, d)
                bad = active & ~(gtd < 0)
                if bool(bad.any()):  # lost descent (rounding): restart those from -H0 g
                    d = torch.where(self.expand(bad).bool(), -hg * g, d)
                    rho[:, bad] = 0.0
                    gtd = self.dot(g, d)
                t = torch.where(active, torch.ones_like(gtd), torch.zeros_like(gtd))
                accepted = ~active
                f_new.copy_(f)
                g_new.copy_(g)
                curv_new.copy_(curv)
                for _ls in range(max_ls):
                    # blocks whose problems all accepted (or stopped) keep their values
                    skip = torch.stack([accepted[bl].all() for bl in self._block_layers]).tolist()
                    x_new = torch.addcmul(x, self.expand(t), d)
                    self.value_grad(x_new, y, n, reg, f_new, g_new, skip, curv_new, mask)
                    ok = (f_new <= f + 1e-4 * t * gtd) & torch.isfinite(f_new)
                    accepted |= ok
                    if bool(accepted.all()):
                        break
                    # quadratic interpolation of the step, kept in [0.1 t, 0.5 t]
                    denom = 2.0 * (f_new - f - gtd * t)
                    tq = torch.nan_to_num(-gtd * t * t / denom, nan=0.0, posinf=0.0, neginf=0.0)
                    tq = torch.minimum(torch.maximum(tq, 0.1 * t), 0.5 * t)
                    t = torch.where(accepted, t, tq)
                failed = ~accepted
                if bool(failed.any()):  # no decrease found: stay put, stop these problems
                    t = torch.where(failed, torch.zeros_like(t), t)
                    keep = self.expand(failed).bool()
                    x_new = torch.where(keep, x, x_new)
                    g_new = torch.where(keep, g, g_new)
                    f_new = torch.where(failed, f, f_new)
                    curv_new = torch.where(failed[..., None], curv, curv_new)
                s_vec = x_new - x
                y_vec = g_new - g
                sy = self.dot(s_vec, y_vec)
                yy = self.dot(y_vec, y_vec)
                valid = active & ~failed & (sy > 1e-10 * yy) & (yy > 0)
                slot = stored % m
                s_hist[slot] = s_vec
                y_hist[slot] = y_vec
                rho[slot] = torch.where(valid, 1.0 / sy, torch.zeros_like(sy))
                # scale the diagonal to the curvature seen along the step (Nocedal & Wright 7.20)
                yhy = self.dot(y_vec * h0, y_vec)
                gamma = torch.where(valid & (yhy > 0), sy / yhy, gamma)
                stored += 1
                iters += active.long()
                x = x_new
                f, f_new = f_new, f
                g, g_new = g_new, g
                curv, curv_new = curv_new, curv
                gmax = torch.where(active, self.abs_max(g), gmax)
                active = active & (gmax > tol) & ~failed
                if progress:
                    bar.update(1)
                    bar.set_postfix(active=int(active.sum()))
        finally:
            bar.close()
        converged = gmax <= tol
        info = FitInfo(iters.cpu().numpy(), converged.cpu().numpy(), gmax.cpu().numpy(), mask)
        return x, info

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, theta: torch.Tensor, y: torch.Tensor, lo: int, hi: int,
        mask: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy and mean cross-entropy of every problem on rows ``lo:hi``.

        ``mask`` is :attr:`FitInfo.mask` of the fit (classes unseen in training never win).

        Returns
        -------
        accuracy, loss : numpy.ndarray
            ``(L, V)`` float64 each (NaN where ``hi <= lo``).
        """
        n_var, c = theta.shape[1:]
        correct = torch.zeros(self.n_layers, n_var, dtype=torch.float64, device=self.device)
        loss = torch.zeros_like(correct)
        for i, blk in enumerate(self.blocks):
            wt = self._view(theta, i).reshape(blk.size, blk.width, n_var * c).transpose(1, 2)
            wt = wt.contiguous()
            idx = self._block_layers[i]
            for s, xc in blk.chunks(lo, hi, n_var * c, self.device, self.dtype):
                rows = xc.shape[1]
                z = torch.bmm(wt, xc.transpose(1, 2)).view(blk.size, n_var, c, rows)
                if mask is not None:
                    z += mask
                yc = y[s : s + rows].T.expand(blk.size, n_var, rows)
                correct[idx] += (z.argmax(2) == yc).sum(2, dtype=torch.float64)
                lse = torch.logsumexp(z, 2)
                loss[idx] += (lse - z.gather(2, yc[:, :, None]).squeeze(2)).sum(
                    2, dtype=torch.float64)
        count = hi - lo
        if count <= 0:
            nan = np.full((self.n_layers, n_var), np.nan)
            return nan, nan.copy()
        return (correct / count).cpu().numpy(), (loss / count).cpu().numpy()
