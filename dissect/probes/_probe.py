"""The :func:`probe` entry point: per-layer linear probes with control tasks."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._plumbing.device import resolve_device
from .._plumbing.progress import progress_bar
from .._plumbing.store_layers import store_layers
from .._plumbing.token_grid import stored_layouts
from ..errors import DissectError
from ..store import ActivationStore
from ._data import (
    POOLS,
    build_layer,
    make_blocks,
    plan_layer,
    resolve_labels,
    stratified_split,
)
from ._fit import BatchedSoftmax, FitInfo
from .result import LayerProbe, ProbeResult

log = logging.getLogger(__name__)

#: The default validation grid of ``reg`` (``reg="auto"``): 1e-4 ... 1 in half decades.
REG_GRID = tuple(float(v) for v in np.round(10.0 ** np.arange(-4.0, 0.01, 0.5), 10))


@dataclass(frozen=True)
class ProbeOptions:
    """Rarely changed settings of :func:`probe` (the common ones are its keywords).

    Attributes
    ----------
    memory_budget
        Bytes of probe features held in memory (on the device) at once, all layers together
        (default 2 GiB). Layers beyond it are pooled, standardized and reduced in row chunks
        into a temporary file and streamed from it at every optimizer step (same result, more
        I/O); a layer's pooled rows are kept in memory while it is prepared only if they fit
        the budget left, else the store is re-read per pass. The optimizer's state (about
        ``2 * history + 10`` copies of the parameters per variant) gets its own budget of the
        same size: beyond it the ``reg`` candidates / control are fitted in groups.
    read_bytes
        Bytes read from the store (or a temporary file) per chunk.
    val_size
        Share of the training rows held out (stratified) to choose ``reg`` when
        ``reg="auto"``.
    reg_grid
        Candidate ``reg`` values for ``reg="auto"``; the one with the lowest validation
        cross-entropy wins (ties: the stronger), then the probe is refit on all training rows.
    tol
        Convergence: ``max |gradient| <= tol`` per probe (scikit-learn's default criterion).
    grid_tol
        The (looser) tolerance of the fits that only rank the ``reg`` candidates on the
        validation rows; the chosen one is then refit on all training rows to ``tol``,
        warm-started from its candidate fit.
    max_iter
        L-BFGS iterations at most.
    history
        L-BFGS memory (curvature pairs kept).
    reduction
        For layers wider than ``max_features``: ``"pca"``, ``"random"`` (Gaussian random
        projection) or ``"auto"`` (PCA up to ``pca_max_dim`` input features, else random).
    pca_max_dim
        Widest layer reduced by PCA under ``"auto"`` (its covariance is ``D x D`` float64).
    flag_margin
        A layer is flagged ``"train-near-control"`` when train accuracy - control train
        accuracy is below this.
    gap_margin
        A layer is flagged ``"train-test-gap"`` when train accuracy - test accuracy exceeds
        this.
    dtype
        ``"float32"`` (default) or ``"float64"`` features and parameters.
    rotate_max_dim
        Rotate the standardized features of layers up to this wide to their principal axes
        (an orthogonal change of basis: it changes neither the predictions nor the L2 penalty)
        so that the diagonal preconditioner of L-BFGS fits the data term: the same optimum in
        several times fewer iterations on correlated features. Wider layers skip it (its
        ``D^3`` eigendecomposition would cost more than it saves); 0 turns it off. ``None``
        (default): 2048 when each layer has several probes to fit (``reg="auto"`` or a
        control, whose memorizing fits gain most), 512 for a single fixed-``reg`` probe.
    tmpdir
        Where out-of-core features go (default: the system's temporary folder).
    """

    memory_budget: int = 2 << 30
    read_bytes: int = 64 << 20
    val_size: float = 0.2
    reg_grid: tuple[float, ...] = REG_GRID
    tol: float = 1e-4
    grid_tol: float = 1e-3
    max_iter: int = 1000
    history: int = 10
    reduction: str = "auto"
    pca_max_dim: int = 4096
    flag_margin: float = 0.1
    gap_margin: float = 0.2
    dtype: str = "float32"
    rotate_max_dim: int | None = None
    tmpdir: str | None = None


def _check_args(pool: Any, reg: Any, max_features: Any, opts: ProbeOptions) -> None:
    if pool not in POOLS:
        raise DissectError(f"pool must be 'mean', 'max', 'cls' (a transformer's class "
                           f"token) or None (flatten), got {pool!r}")
    if isinstance(reg, str):
        if reg != "auto":
            raise DissectError(f"reg must be 'auto' or a positive float, got {reg!r}")
        if not opts.reg_grid or min(opts.reg_grid) <= 0:
            raise DissectError(f"reg_grid must hold positive values, got {opts.reg_grid!r}")
    elif isinstance(reg, bool) or not isinstance(reg, (int, float)) or not reg > 0:
        raise DissectError(f"reg must be 'auto' or a positive float (the L2 strength), got "
                           f"{reg!r}")
    if max_features is not None and (
        isinstance(max_features, bool) or not isinstance(max_features, (int, np.integer))
        or max_features < 1
    ):
        raise DissectError(f"max_features must be a positive int or None, got {max_features!r}")
    if opts.dtype not in ("float32", "float64"):
        raise DissectError(f"dtype must be 'float32' or 'float64', got {opts.dtype!r}")
    if opts.reduction not in ("auto", "pca", "random"):
        raise DissectError(f"reduction must be 'auto', 'pca' or 'random', got "
                           f"{opts.reduction!r}")
    if not 0.0 < opts.val_size < 1.0:
        raise DissectError(f"val_size must be in (0, 1), got {opts.val_size!r}")


def _fit_in_groups(
    model: BatchedSoftmax, y: torch.Tensor, n: int, reg: torch.Tensor,
    x0: torch.Tensor | None, opts: ProbeOptions, progress: bool, desc: str, tol: float,
) -> tuple[torch.Tensor, FitInfo]:
    """Fit the variants (columns) in as few groups as the memory budget allows.

    The optimizer's state is ``(2 * history + 10)`` parameter-sized tensors per variant;
    variants are independent, so fitting them in groups gives the same result.
    """
    n_var = y.shape[1]
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    per_variant = (2 * opts.history + 10) * model.n_rows * model.n_classes * itemsize
    size = max(1, min(n_var, opts.memory_budget // max(1, per_variant)))
    if size < n_var:
        log.info("fitting %d variants in groups of %d (optimizer state %.0f MiB per variant)",
                 n_var, size, per_variant / 2**20)
    thetas, infos = [], []
    for lo in range(0, n_var, size):
        hi = min(n_var, lo + size)
        th, info = model.fit(
            y[:, lo:hi], n, reg[:, lo:hi].contiguous(),
            x0=None if x0 is None else x0[:, lo:hi].contiguous(), tol=tol,
            max_iter=opts.max_iter, history=opts.history, progress=progress, desc=desc)
        thetas.append(th)
        infos.append(info)
    if len(infos) == 1:
        return thetas[0], infos[0]
    masks = [i.mask if i.mask is not None else torch.zeros(
        i.iterations.shape[1], model.n_classes, 1, device=model.device) for i in infos]
    cat = FitInfo(*(np.concatenate([getattr(i, k) for i in infos], axis=1)
                    for k in ("iterations", "converged", "grad_max")),
                  mask=torch.cat(masks) if any(i.mask is not None for i in infos) else None)
    return torch.cat(thetas, 1), cat


def probe(
    store: ActivationStore | str | Path,
    labels: Any,
    layers: str | Sequence[str] | None = None,
    *,
    pool: str | None = "mean",
    test_size: float | int = 0.25,
    seed: int = 0,
    reg: float | str = "auto",
    max_features: int | None = None,
    control: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    options: ProbeOptions | None = None,
) -> ProbeResult:
    """Fit a linear classifier probe on every layer of a store (Alain & Bengio 2016).

    Each layer's probe is a multinomial logistic regression on its (pooled) activations,
    standardized with the training rows' mean and standard deviation, minimizing
    ``mean cross-entropy + reg / 2 * ||W||^2`` (bias unpenalized): scikit-learn's
    ``LogisticRegression(C=1 / (reg * n_train))``. Every layer's probes (and, with ``reg="auto"``,
    every candidate ``reg``, and the control) train together in one batched L-BFGS run on
    ``device``, each to its own convergence (``max |grad| <= options.tol``).

    With ``control=True`` the same probe is also trained on the labels permuted across samples
    (Hewitt & Liang 2019: same class balance, no information). Its training accuracy is what
    the probe can memorize (it reaches 100% once features outnumber samples); a layer whose
    real training accuracy is within ``options.flag_margin`` (0.1) of it, or whose train - test
    gap exceeds ``options.gap_margin`` (0.2), is flagged.

    Parameters
    ----------
    store
        An :class:`~dissect.store.ActivationStore` or the path of one.
    labels
        One integer class per store row (array, tensor or list), a dataset with ``targets``
        (read through the store's ``/index``), or ``"targets"``: the targets of the dataset
        the store records under its ``dataset`` attribute, else of
        ``SyntheticConcepts(seed=0)`` (see :func:`dissect.probes.dataset_targets`).
    layers
        Layer name(s) to probe (default: every layer of the store, in its order = depth).
    pool
        How ``(N, K, H, W)`` activations become features: ``"mean"`` or ``"max"`` over space
        (``"max"`` reads the store's exact per-sample maxima), or ``None`` to flatten. Already
        pooled ``(N, K)`` layers are used as stored. A transformer layer captured from tokens
        is stored as the map of its patch tokens, so ``"mean"`` is the mean over the patch
        tokens (the class token left out); ``"cls"`` reads its class token instead, the first
        of the prefix tokens the store keeps (:meth:`ActivationStore.prefix
        <dissect.store.ActivationStore.prefix>`; torchvision's and timm's ViTs put the class
        token first). ``"cls"`` on a layer without prefix tokens is an error.
    test_size
        Held-out share (or row count) of the stratified split; deterministic from ``seed``.
    seed
        Seeds the split, the validation split, the control permutation and random projections.
    reg
        ``"auto"`` (choose per layer from ``options.reg_grid`` by cross-entropy on a
        stratified validation share ``options.val_size`` of the training rows, then refit on
        all of them) or a fixed L2 strength ``> 0``.
    max_features
        Layers with more features are reduced to this many: PCA of the standardized training
        rows (or a random projection for very wide layers, see :class:`ProbeOptions`); the
        result records it.
    control
        Also train the control probes.
    device
        ``None`` for CUDA when available, else the CPU.
    progress
        Show progress bars.
    options
        A :class:`ProbeOptions` (memory budget, grid, tolerance, flag margins, ...).

    Returns
    -------
    ProbeResult

    Raises
    ------
    DataError
        Labels not aligned with the rows, a single class, NaN or infinite activations.
    LayerNotFoundError
        A layer the store does not hold.
    DissectError
        Bad arguments.

    Examples
    --------
    >>> result = probe("acts.h5", dataset.targets, pool="mean")      # doctest: +SKIP
    >>> print(result.summary()); result.plot("probes.png")           # doctest: +SKIP
    >>> result["layer4"].test_accuracy, result["layer4"].selectivity  # doctest: +SKIP
    """
    opts = options or ProbeOptions()
    _check_args(pool, reg, max_features, opts)
    own = not isinstance(store, ActivationStore)
    st = ActivationStore(store) if own else store
    try:
        return _probe(st, labels, layers, pool, test_size, seed, reg, max_features, control,
                      resolve_device(device), progress, opts)
    finally:
        if own:
            st.close()


def _probe(
    store: ActivationStore,
    labels: Any,
    layers: str | Sequence[str] | None,
    pool: str | None,
    test_size: float | int,
    seed: int,
    reg: float | str,
    max_features: int | None,
    control: bool,
    dev: torch.device,
    progress: bool,
    opts: ProbeOptions,
) -> ProbeResult:
    t0 = time.perf_counter()
    names = store_layers(store, layers, what="probe")
    raw = resolve_labels(store, labels)
    n = len(raw)
    classes, y = np.unique(raw, return_inverse=True)
    n_classes = len(classes)
    train_idx, test_idx = stratified_split(y, test_size, seed)
    auto = reg == "auto"
    if auto:
        fit_pos, val_pos = stratified_split(y[train_idx], opts.val_size, [seed, 1])
        fit_idx, val_idx = train_idx[fit_pos], train_idx[val_pos]
    else:
        fit_idx, val_idx = train_idx, np.zeros(0, dtype=np.int64)
    order = np.concatenate([fit_idx, val_idx, test_idx])
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    n_fit, n_train = len(fit_idx), len(train_idx)

    dtype = getattr(torch, opts.dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    stored_pool = store.meta.get("pool")
    rotate = opts.rotate_max_dim
    if rotate is None:
        rotate = 2048 if (auto or control) else 512
    plans = [plan_layer(store, name, i, pool, max_features, opts.reduction, opts.pca_max_dim,
                        rotate, stored_pool) for i, name in enumerate(names)]
    with tempfile.TemporaryDirectory(prefix="dissect-probes-", dir=opts.tmpdir) as tmp:
        blocks, writers, used = make_blocks(
            plans, n, budget=opts.memory_budget, itemsize=itemsize, read_bytes=opts.read_bytes,
            device=dev, dtype=dtype, tmpdir=Path(tmp))
        for plan in progress_bar(desc="probe features", enabled=progress, unit="layer",
                                 iterable=plans, outer=True):
            rp_seed = int(np.random.SeedSequence([seed, 3, plan.position]).generate_state(1)[0])
            build_layer(store, plan, pool, n=n, position=position, n_train=n_train,
                        writer=writers[plan.position], budget=opts.memory_budget - used,
                        read_bytes=opts.read_bytes, seed=rp_seed, device=dev, progress=progress)
        del writers
        t_read = time.perf_counter()
        model = BatchedSoftmax(blocks, len(names), n_classes, dev, dtype,
                               variances=[p.variances for p in plans])
        y_real = torch.from_numpy(y[order]).to(dev)
        perm = np.random.default_rng([seed, 2]).permutation(n)
        y_ctrl = torch.from_numpy(y[perm][order]).to(dev)

        x0 = None
        if auto:
            grid = torch.tensor(opts.reg_grid, dtype=torch.float64, device=dev)
            n_grid = len(grid)
            y1 = y_real[:, None].expand(n, n_grid)
            th1, info1 = _fit_in_groups(
                model, y1, n_fit, grid[None].expand(len(names), n_grid), None, opts, progress,
                "probe reg grid", opts.grid_tol)
            _, val_loss = model.evaluate(th1, y1, n_fit, n_train, info1.mask)
            # lowest validation loss; ties go to the stronger regularization
            best = n_grid - 1 - np.argmin(val_loss[:, ::-1], axis=1)
            chosen = np.asarray(opts.reg_grid, dtype=np.float64)[best]
            for name, losses, b in zip(names, val_loss, best, strict=True):
                log.debug("layer %s: validation loss %s -> reg %g", name,
                          np.round(losses, 4).tolist(), opts.reg_grid[b])
            pick = torch.from_numpy(best).to(dev)[model.row_layer]
            x0 = th1[torch.arange(model.n_rows, device=dev), pick][:, None]
            del th1
        else:
            chosen = np.full(len(names), float(reg))
        n_var = 2 if control else 1
        y2 = torch.stack([y_real, y_ctrl], 1) if control else y_real[:, None]
        if x0 is not None and control:
            x0 = torch.cat([x0, torch.zeros_like(x0)], 1)
        reg2 = torch.from_numpy(chosen).to(dev)[:, None].expand(len(names), n_var).contiguous()
        theta, info = _fit_in_groups(model, y2, n_train, reg2, x0, opts, progress, "probe fit",
                                     opts.tol)
        t_fit = time.perf_counter()
        train_acc, _ = model.evaluate(theta, y2, 0, n_train, info.mask)
        test_acc, test_loss = model.evaluate(theta, y2, n_train, n, info.mask)
        del model, blocks

    test_counts = np.bincount(y[test_idx], minlength=n_classes)
    chance = float(test_counts.max() / len(test_idx))
    not_converged = [names[i] for i in range(len(names)) if not info.converged[i].all()]
    if not_converged:
        log.warning("probes of %s did not converge in %d iterations (max |grad| %s > tol %g)",
                    not_converged, opts.max_iter,
                    np.round(info.grad_max.max(1), 6).tolist(), opts.tol)
    rows = []
    for i, plan in enumerate(plans):
        tr, te = float(train_acc[i, 0]), float(test_acc[i, 0])
        ctr = float(train_acc[i, 1]) if control else float("nan")
        cte = float(test_acc[i, 1]) if control else float("nan")
        reasons = []
        if control and tr - ctr < opts.flag_margin:
            reasons.append("train-near-control")
        if tr - te > opts.gap_margin:
            reasons.append("train-test-gap")
        rows.append(LayerProbe(
            layer=plan.name, depth=i, train_accuracy=tr, test_accuracy=te,
            test_loss=float(test_loss[i, 0]), chance=chance, control_train_accuracy=ctr,
            control_test_accuracy=cte, selectivity=te - cte if control else float("nan"),
            flagged=bool(reasons), flag_reasons=tuple(reasons), n_features=plan.n_features,
            input_features=plan.input_features, reduction=plan.reduction,
            explained_variance=plan.explained_variance, reg=float(chosen[i]),
            converged=bool(info.converged[i].all()), iterations=int(info.iterations[i, 0]),
        ))
    t_end = time.perf_counter()
    log.info("probed %d layers (%d rows, %d classes) in %.2fs: features %.2fs, fit %.2fs",
             len(names), n, n_classes, t_end - t0, t_read - t0, t_fit - t_read)
    settings = {
        "store": str(store.path), "pool": pool, "test_size": test_size, "seed": seed,
        "reg": reg if auto else float(reg), "max_features": max_features, "control": control,
        "n_samples": n, "n_train": n_train, "n_test": len(test_idx), "n_val": len(val_idx),
        "device": str(dev), **{k: v for k, v in asdict(opts).items() if k != "tmpdir"},
    }
    settings["reg_grid"] = list(opts.reg_grid)
    layouts = stored_layouts(store, names)
    if layouts:  # the layers read from token outputs (the report shows them)
        settings["tokens"] = layouts
    return ProbeResult(rows, classes=classes, train_index=train_idx, test_index=test_idx,
                       val_index=np.sort(val_idx), settings=settings)
