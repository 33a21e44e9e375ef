"""Probe results: one :class:`LayerProbe` row per layer, a :class:`ProbeResult` for the run."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .._plumbing.result_files import read_json, result_path, write_json
from ..errors import DissectError

FORMAT = "torch-dissect-probes"
VERSION = 1


@dataclass(frozen=True)
class LayerProbe:
    """The linear probe of one layer (accuracies are fractions in [0, 1]).

    Attributes
    ----------
    layer
        The layer name.
    depth
        Position of the layer in the probed list (0 = first).
    train_accuracy, test_accuracy
        Accuracy of the probe on its training rows and on the held-out test rows.
    test_loss
        Mean cross-entropy (nats) on the test rows.
    chance
        The majority class's share of the test rows (the accuracy of always guessing it).
    control_train_accuracy, control_test_accuracy
        The same probe (same features, split and ``reg``) trained on the labels permuted across
        samples (Hewitt & Liang 2019): the training accuracy measures what the probe can
        memorize, the test accuracy is chance by construction. NaN without a control.
    selectivity
        ``test_accuracy - control_test_accuracy``.
    flagged
        True when the training accuracy is not trustworthy: see ``flag_reasons``.
    flag_reasons
        ``"train-near-control"``: ``train_accuracy - control_train_accuracy < flag_margin``
        (the probe fits permuted labels about as well as the real ones: its training accuracy
        shows capacity, not information); ``"train-test-gap"``: ``train_accuracy -
        test_accuracy > gap_margin``. Margins: :class:`~dissect.probes.ProbeOptions`.
    n_features
        Features the probe reads (after any reduction).
    input_features
        Features of the pooled layer before reduction.
    reduction
        ``None``, ``"pca"`` or ``"random"`` (Gaussian random projection).
    explained_variance
        Share of the standardized features' training variance kept by PCA (else None).
    reg
        The L2 strength used: ``mean CE + reg / 2 * ||W||^2``, i.e. scikit-learn's
        ``C = 1 / (reg * n_train)``.
    converged
        Whether L-BFGS reached ``max |grad| <= tol`` for the real probe (and the control).
    iterations
        L-BFGS iterations of the real probe.
    """

    layer: str
    depth: int
    train_accuracy: float
    test_accuracy: float
    test_loss: float
    chance: float
    control_train_accuracy: float
    control_test_accuracy: float
    selectivity: float
    flagged: bool
    flag_reasons: tuple[str, ...]
    n_features: int
    input_features: int
    reduction: str | None
    explained_variance: float | None
    reg: float
    converged: bool
    iterations: int


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


class ProbeResult:
    """Per-layer linear probes of one store (made by :func:`dissect.probes.probe`).

    Index it by layer name (``result["features.6"]`` is a :class:`LayerProbe`), iterate over its
    rows, or render it with :meth:`summary`, :meth:`plot`, :meth:`to_csv` and :meth:`to_json`.

    Attributes
    ----------
    layers
        Probed layers in depth order.
    classes
        The distinct label values, in the order of the probe's outputs.
    train_index, test_index
        Store rows of the training and test split (sorted); the validation rows used to
        choose ``reg`` (``val_index``) are part of ``train_index``.
    settings
        The call's settings (pool, test_size, seed, reg, max_features, control, flag margins,
        tolerance, row counts, store path; ``tokens``: the layout of each layer read from
        token outputs, ``{layer: {"prefix", "grid", "channels_last"}}``, when there are any).
    """

    def __init__(
        self,
        rows: list[LayerProbe],
        *,
        classes: np.ndarray,
        train_index: np.ndarray,
        test_index: np.ndarray,
        val_index: np.ndarray | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self._rows = {r.layer: r for r in rows}
        self.layers = [r.layer for r in rows]
        self.classes = np.asarray(classes)
        self.train_index = np.asarray(train_index, dtype=np.int64)
        self.test_index = np.asarray(test_index, dtype=np.int64)
        self.val_index = np.asarray(
            [] if val_index is None else val_index, dtype=np.int64)
        self.settings = dict(settings or {})

    def __getitem__(self, layer: str) -> LayerProbe:
        if layer not in self._rows:
            raise DissectError(f"layer {layer!r} was not probed; layers: {self.layers}")
        return self._rows[layer]

    def __iter__(self):
        return iter(self._rows[layer] for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer: object) -> bool:
        return layer in self._rows

    def __repr__(self) -> str:
        flagged = sum(r.flagged for r in self)
        return f"ProbeResult({len(self)} layers, {flagged} flagged)"

    @property
    def flagged(self) -> list[str]:
        """Layers whose training accuracy is not to be trusted (see :class:`LayerProbe`)."""
        return [r.layer for r in self if r.flagged]

    # ------------------------------------------------------------------ text

    def summary(self) -> str:
        """A table of every layer; flagged layers end with ``!`` and the reason."""
        s = self.settings
        head = (f"Linear probes: {len(self.layers)} layers, {len(self.classes)} classes, "
                f"{len(self.train_index)} train / {len(self.test_index)} test rows, "
                f"pool={s.get('pool')}, reg={s.get('reg')}, seed={s.get('seed')}")
        width = max([5] + [len(name) for name in self.layers])
        cols = (f"{'layer':<{width}} {'feats':>6} {'reg':>8} {'train':>6} {'test':>6} "
                f"{'ctl-tr':>6} {'ctl-te':>6} {'select':>6} {'chance':>6}")
        lines = [head, cols]

        def pct(v: float) -> str:
            return "   n/a" if math.isnan(v) else f"{100 * v:6.1f}"

        for r in self:
            feats = str(r.n_features) + ("*" if r.reduction else "")
            line = (f"{r.layer:<{width}} {feats:>6} {r.reg:>8.1e} {pct(r.train_accuracy)} "
                    f"{pct(r.test_accuracy)} {pct(r.control_train_accuracy)} "
                    f"{pct(r.control_test_accuracy)} {pct(r.selectivity)} {pct(r.chance)}")
            if r.flagged:
                line += "  ! " + ", ".join(r.flag_reasons)
            if not r.converged:
                line += "  (not converged)"
            lines.append(line)
        lines.append("accuracies in %; ctl = control task (labels permuted across samples); "
                     "select = test - ctl-te")
        if any(r.reduction for r in self):
            lines.append("* features reduced: " + ", ".join(
                f"{r.layer} {r.input_features}->{r.n_features} {r.reduction}"
                for r in self if r.reduction))
        if self.flagged:
            lines.append(
                f"! WARNING: {len(self.flagged)} flagged layer(s): their train accuracy is not "
                f"evidence. train-near-control = train accuracy within "
                f"{s.get('flag_margin', 0.1):.2f} of the control's (the probe fits permuted "
                f"labels as well); train-test-gap = train - test > "
                f"{s.get('gap_margin', 0.2):.2f}. Read test accuracy and selectivity.")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files

    def to_csv(self, path: str | Path) -> Path:
        """One row per layer with every :class:`LayerProbe` field (reasons joined by ``;``).

        ``path`` is the file, or an existing folder to write ``probes.csv`` in.
        """
        path = result_path(path, "probes.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [f.name for f in fields(LayerProbe)]
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(names)
            for r in self:
                row = []
                for name in names:
                    v = getattr(r, name)
                    if name == "flag_reasons":
                        v = ";".join(v)
                    elif isinstance(v, float):
                        v = "" if math.isnan(v) else f"{v:.6g}"
                    elif v is None:
                        v = ""
                    row.append(v)
                w.writerow(row)
        return path

    def to_json(self, path: str | Path) -> Path:
        """Everything (rows, split, classes, settings) as one JSON file (NaN as null).

        ``path`` is the file, or an existing folder to write ``probes.json`` in.
        """
        data = {
            "format": FORMAT,
            "version": VERSION,
            "settings": self.settings,
            "classes": self.classes.tolist(),
            "train_index": self.train_index.tolist(),
            "test_index": self.test_index.tolist(),
            "val_index": self.val_index.tolist(),
            "layers": [
                {k: _nan_to_none(v) for k, v in asdict(r).items()} for r in self
            ],
        }
        return write_json(result_path(path, "probes.json"), data)

    @classmethod
    def from_json(cls, path: str | Path) -> ProbeResult:
        """Load a result written by :meth:`to_json`."""
        data = read_json(result_path(path, "probes.json"), FORMAT, VERSION, "probe result")
        try:
            rows = []
            for d in data["layers"]:
                d = dict(d)
                for k in ("train_accuracy", "test_accuracy", "test_loss", "chance",
                          "control_train_accuracy", "control_test_accuracy", "selectivity"):
                    d[k] = float("nan") if d[k] is None else float(d[k])
                d["flag_reasons"] = tuple(d["flag_reasons"])
                rows.append(LayerProbe(**d))
            return cls(rows, classes=np.asarray(data["classes"]),
                       train_index=np.asarray(data["train_index"], dtype=np.int64),
                       test_index=np.asarray(data["test_index"], dtype=np.int64),
                       val_index=np.asarray(data.get("val_index", []), dtype=np.int64),
                       settings=data.get("settings", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise DissectError(f"{path} is a damaged probe result: {exc!r}") from exc

    # ------------------------------------------------------------------ figure

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Draw accuracy against depth (train, test, control train/test, chance) as a PNG.

        Flagged layers are circled in red. Needs matplotlib (imported here, Agg canvas: no
        display and no global pyplot state).

        Parameters
        ----------
        path
            The image file to write (``.png``; other matplotlib formats by suffix), or an
            existing folder to write ``probes.png`` in.
        title
            The figure title (default: a description of the run).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise DissectError("result.plot needs matplotlib: pip install matplotlib") from exc
        path = result_path(path, "probes.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        x = np.arange(len(self.layers))
        col = {k: np.array([getattr(r, k) for r in self], dtype=float) for k in (
            "train_accuracy", "test_accuracy", "control_train_accuracy",
            "control_test_accuracy", "chance")}
        fig = Figure(figsize=(max(6.0, 0.45 * len(x) + 3) + 2.2, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(x, col["train_accuracy"], "o-", color="tab:blue", label="train")
        ax.plot(x, col["test_accuracy"], "s-", color="tab:orange", label="test")
        if not np.all(np.isnan(col["control_train_accuracy"])):
            ax.plot(x, col["control_train_accuracy"], "o--", color="tab:blue", alpha=0.55,
                    label="control train (permuted labels)")
            ax.plot(x, col["control_test_accuracy"], "s--", color="tab:orange", alpha=0.55,
                    label="control test")
        ax.plot(x, col["chance"], ":", color="gray", label="chance (majority class)")
        flagged = np.array([r.flagged for r in self], dtype=bool)
        if flagged.any():
            ax.scatter(x[flagged], col["train_accuracy"][flagged], s=160, facecolors="none",
                       edgecolors="red", linewidths=1.5, zorder=5, label="flagged")
        ax.set_xticks(x)
        ax.set_xticklabels(self.layers, rotation=45 if len(x) > 4 else 0, ha="right"
                           if len(x) > 4 else "center", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("layer (depth)")
        ax.set_ylabel("accuracy")
        s = self.settings
        ax.set_title(title or f"Linear probes (pool={s.get('pool')}, reg={s.get('reg')})",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(path)
        return path
