"""Figures without pyplot's global state: a matplotlib Figure on an Agg canvas, and writing it
(the result objects' ``plot()`` methods share these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DissectError
from .result_files import result_path


def new_figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure on an Agg canvas (no display, no global pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise DissectError("plotting needs matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def finish_figure(fig: Any, path: str | Path | None, default_name: str) -> Any:
    """Return ``fig`` when ``path`` is None, else write it there and return the path."""
    fig.tight_layout()
    if path is None:
        return fig
    out = result_path(path, default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
