"""The result of :func:`~dissect.similarity.cka_matrix`: :class:`SimilarityResult`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from .._plumbing.arrays import decode_array, encode_array
from .._plumbing.figures import finish_figure, new_figure
from .._plumbing.result_files import read_json, result_path, write_json
from ..errors import DissectError

FORMAT = "torch-dissect-similarity"
VERSION = 1




class SimilarityResult:
    """A matrix of layer similarities (CKA) with its row and column layers.

    Attributes
    ----------
    matrix
        float64 ``(len(rows), len(cols))``; ``matrix[i, j]`` compares ``rows[i]`` with
        ``cols[j]``.
    rows, cols
        Layer names (of the first store, and of the second store or the first).
    error
        ``None`` when every value is exact, else float64 ``(len(rows), len(cols))``: the stated
        error bound of each value (0 where exact; see :func:`~dissect.similarity.cka_matrix`).
    settings
        How it was computed (pool, debiased, rows compared, stores, sketches).
    """

    def __init__(self, matrix: Any, rows: list[str], cols: list[str], *,
                 error: Any = None, settings: dict[str, Any] | None = None) -> None:
        self.matrix = np.asarray(matrix, dtype=np.float64)
        self.rows = [str(r) for r in rows]
        self.cols = [str(c) for c in cols]
        if self.matrix.shape != (len(self.rows), len(self.cols)):
            raise DissectError(f"matrix of shape {self.matrix.shape} for {len(self.rows)} rows "
                               f"and {len(self.cols)} columns")
        self.error = None if error is None else np.asarray(error, dtype=np.float64)
        if self.error is not None and self.error.shape != self.matrix.shape:
            raise DissectError(f"error of shape {self.error.shape}, matrix {self.matrix.shape}")
        self.settings = dict(settings or {})

    @property
    def measure(self) -> str:
        """``"debiased CKA"`` or ``"CKA"``."""
        return "debiased CKA" if self.settings.get("debiased") else "CKA"

    def __getitem__(self, key: tuple[str, str]) -> float:
        """``result["features.3", "features.9"]``: the value of one pair of layers."""
        try:
            row, col = key
            return float(self.matrix[self.rows.index(row), self.cols.index(col)])
        except (TypeError, ValueError):
            raise DissectError(f"index a SimilarityResult by (row layer, column layer); rows: "
                               f"{self.rows}, columns: {self.cols}") from None

    def __repr__(self) -> str:
        return f"SimilarityResult({self.measure}, {len(self.rows)} x {len(self.cols)} layers)"

    # ------------------------------------------------------------------ text

    def summary(self) -> str:
        """The matrix as a table (2 decimals), with each row's most similar other layer."""
        s = self.settings
        head = (f"{self.measure}: {len(self.rows)} x {len(self.cols)} layers, "
                f"{s.get('rows_compared', '?')} rows, pool={s.get('pool')}"
                + (f", against {s['other']}" if s.get("other") else ""))
        lines = [head]
        width = max(len(r) for r in self.rows)
        if len(self.cols) <= 24:
            lines.append(" " * width + " " + " ".join(f"{j:>5d}" for j in range(len(self.cols))))
            for name, values in zip(self.rows, self.matrix, strict=True):
                lines.append(f"{name:<{width}} " + " ".join(f"{v:5.2f}" for v in values))
            lines.append("columns: " + ", ".join(f"{j}={c}" for j, c in enumerate(self.cols)))
        same = self.rows == self.cols
        best = []
        for i, name in enumerate(self.rows):
            values = self.matrix[i].copy()
            if same:
                values[i] = -np.inf
            if np.all(np.isneginf(values)):
                continue
            j = int(np.argmax(values))
            best.append(f"{name} -> {self.cols[j]} ({values[j]:.3f})")
        if best:
            lines.append(("most similar other layer: " if same else "most similar column: ")
                         + "; ".join(best))
        if self.error is not None and np.any(self.error > 0):
            sk = s.get("sketched", [])
            lines.append(
                f"approximate: {len(sk)} layer(s) sketched to {s.get('max_dim')} features; "
                f"largest error bound {float(self.error.max()):.3f} (result.error)")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files

    def to_csv(self, path: str | Path) -> Path:
        """The matrix with a header row of column layers and a first column of row layers.

        ``path`` is the file, or an existing folder to write ``similarity.csv`` in.
        """
        path = result_path(path, "similarity.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["layer", *self.cols])
            for name, values in zip(self.rows, self.matrix, strict=True):
                w.writerow([name, *(repr(float(v)) for v in values)])
        return path

    def to_json(self, path: str | Path) -> Path:
        """Everything as one JSON file (arrays exact). ``path`` may be an existing folder (then
        ``similarity.json`` in it)."""
        doc = {"format": FORMAT, "version": VERSION, "rows": self.rows, "cols": self.cols,
               "matrix": encode_array(self.matrix),
               "error": None if self.error is None else encode_array(self.error),
               "settings": self.settings}
        return write_json(result_path(path, "similarity.json"), doc)

    @classmethod
    def from_json(cls, path: str | Path) -> SimilarityResult:
        """Load a result written by :meth:`to_json`."""
        path = result_path(path, "similarity.json")
        doc = read_json(path, FORMAT, VERSION, "similarity result")
        try:
            error = doc.get("error")
            return cls(decode_array(doc["matrix"], "matrix"), list(doc["rows"]),
                       list(doc["cols"]),
                       error=None if error is None else decode_array(error, "error"),
                       settings=doc.get("settings") or {})
        except (KeyError, TypeError) as exc:
            raise DissectError(f"{path} is a damaged similarity result: {exc!r}") from exc

    # ------------------------------------------------------------------ figure

    def plot(self, path: str | Path | None = None, *, title: str | None = None,
             annotate: bool | None = None) -> Any:
        """Draw the matrix as a heatmap.

        Parameters
        ----------
        path
            Where to write the image (``.png``, other formats by suffix; an existing folder
            receives ``similarity.png``). ``None``: return the figure.
        title
            The title (default: the measure and the stores).
        annotate
            Write each value in its cell (default: when the matrix has at most 20 x 20 cells).

        Returns
        -------
        matplotlib.figure.Figure or pathlib.Path
            The figure when ``path`` is None, else the file written.
        """
        la, lb = len(self.rows), len(self.cols)
        fig = new_figure((min(16.0, 2.5 + 0.42 * lb), min(14.0, 2.0 + 0.38 * la)))
        ax = fig.add_subplot(1, 1, 1)
        low = min(0.0, float(np.nanmin(self.matrix))) if self.matrix.size else 0.0
        image = ax.imshow(self.matrix, vmin=low, vmax=1.0, cmap="magma", origin="lower",
                          aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=self.measure)
        ax.set_xticks(range(lb))
        ax.set_xticklabels(self.cols, rotation=90, fontsize=7)
        ax.set_yticks(range(la))
        ax.set_yticklabels(self.rows, fontsize=7)
        s = self.settings
        ax.set_xlabel(Path(s["other"]).name if s.get("other") else "layer")
        ax.set_ylabel(Path(s["store"]).name if s.get("store") and s.get("other") else "layer")
        if annotate if annotate is not None else (la <= 20 and lb <= 20):
            for i in range(la):
                for j in range(lb):
                    v = self.matrix[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                            color="black" if v > 0.6 else "white")
        ax.set_title(title or f"{self.measure} (pool={s.get('pool')})", fontsize=10)
        return finish_figure(fig, path, "similarity.png")
