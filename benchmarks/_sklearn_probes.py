"""The scikit-learn side of ``bench_probes.py``, importable without torch.

``bench_probes.py`` runs it in a fresh process (``python _sklearn_probes.py JOB.json``) that never
imports torch, so scikit-learn's BLAS threads do not compete with an idle torch thread pool
(on a 2-core machine that contention slows scikit-learn several-fold at 2 threads). The worker
reads the layers straight from the store's HDF5 file (``activations/<layer>``), runs one
untimed warm-up fit, then the job, and prints ``RESULT {json}`` with the seconds the job took
(process start and imports excluded) and its accuracies.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np

Reader = Callable[[str], np.ndarray]  # layer name -> (N, D) float32 features


def sk_layer_data(read: Reader, layer: str, train: np.ndarray, test: np.ndarray):
    """Standardized (training statistics) train and test rows of one layer."""
    from sklearn.preprocessing import StandardScaler

    x = read(layer)  # float32, as stored (sklearn's lbfgs keeps float32: its fastest)
    scaler = StandardScaler().fit(x[train])
    return scaler.transform(x[train]), scaler.transform(x[test])


def sk_fit(x: np.ndarray, y: np.ndarray, reg: float):
    """``LogisticRegression`` (lbfgs, multinomial) with our ``reg``: ``C = 1 / (reg * n)``."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning is reported by n_iter_
        return LogisticRegression(C=1.0 / (reg * len(x)), tol=1e-4, max_iter=10000).fit(x, y)


def sklearn_fixed(read: Reader, layers: Sequence[str], y: np.ndarray, train: np.ndarray,
                  test: np.ndarray, reg: float) -> dict[str, tuple[float, float]]:
    """Per layer: (train accuracy, test accuracy) of sklearn at a fixed reg."""
    out = {}
    for layer in layers:
        xtr, xte = sk_layer_data(read, layer, train, test)
        clf = sk_fit(xtr, y[train], reg)
        out[layer] = (clf.score(xtr, y[train]), clf.score(xte, y[test]))
    return out


def sklearn_full(read: Reader, layers: Sequence[str], y: np.ndarray, train: np.ndarray,
                 test: np.ndarray, val: np.ndarray, seed: int, regs: dict[str, float],
                 grid: Sequence[float]) -> dict[str, tuple[float, float, float]]:
    """Per layer, sklearn doing probe()'s work: grid on the fit rows, refit, control.

    ``regs`` are the regularizations our probe chose; the refits use them, so accuracies
    compare at the same reg even where the validation choice differs.

    Returns (chosen reg, test accuracy at our chosen reg, control test accuracy) per layer.
    """
    from sklearn.metrics import log_loss

    fit = np.setdiff1d(train, val)
    perm = np.random.default_rng([seed, 2]).permutation(len(y))
    y_ctrl = y[perm]
    pos = {r: i for i, r in enumerate(train)}
    fit_rows = np.array([pos[r] for r in fit])
    val_rows = np.array([pos[r] for r in val])
    out = {}
    for layer in layers:
        xtr, xte = sk_layer_data(read, layer, train, test)
        losses = []
        for reg in grid:
            clf = sk_fit(xtr[fit_rows], y[fit], reg)
            losses.append(log_loss(y[val], clf.predict_proba(xtr[val_rows]),
                                   labels=np.unique(y)))
        best = len(grid) - 1 - int(np.argmin(losses[::-1]))
        clf = sk_fit(xtr, y[train], regs[layer])
        ctrl = sk_fit(xtr, y_ctrl[train], regs[layer])
        out[layer] = (grid[best], clf.score(xte, y[test]), ctrl.score(xte, y_ctrl[test]))
    return out


def run_job(job: dict) -> dict:
    """Run one timed job (``"fixed"`` or ``"full"``) described by plain JSON values."""
    import h5py

    with h5py.File(job["store"], "r") as f:
        def read(layer: str) -> np.ndarray:
            return f["activations/" + layer][:]

        y = np.asarray(job["y"])
        arr = {k: np.asarray(job[k], dtype=np.int64) for k in ("train", "test", "val")
               if k in job}
        sk_fit(np.random.default_rng(0).normal(size=(50, 4)), np.arange(50) % 3, 1.0)  # warm-up
        t0 = time.perf_counter()
        if job["kind"] == "fixed":
            out = sklearn_fixed(read, job["layers"], y, arr["train"], arr["test"], job["reg"])
        else:
            out = sklearn_full(read, job["layers"], y, arr["train"], arr["test"], arr["val"],
                               job["seed"], job["regs"], job["grid"])
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "out": {k: list(v) for k, v in out.items()},
            "torch_loaded": "torch" in sys.modules}


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print("RESULT " + json.dumps(run_job(json.load(fh))), flush=True)
