"""The report's charts, drawn with matplotlib (Agg backend, no display needed).

- :func:`concept_bar_chart`: Network Dissection's figure: for one layer, the number of unique
  detectors of each concept, sorted, bars colored by category.
- :func:`category_chart`: detectors per category for every layer (stacked bars).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CATEGORY_COLORS = {  # the paper's palette as far as it goes, then matplotlib's tab10
    "object": "#1f77b4", "scene": "#2ca02c", "part": "#ff7f0e", "material": "#9467bd",
    "texture": "#d62728", "color": "#8c564b",
}
FALLBACK = ["#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def category_colors(categories: Sequence[str]) -> dict[str, str]:
    """A stable color per category (the paper's for Broden's six, then tab10's)."""
    out, spare = {}, iter(FALLBACK * (1 + len(categories) // len(FALLBACK)))
    for c in categories:
        out[c] = CATEGORY_COLORS.get(c) or next(spare)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def concept_bar_chart(result: Any, layer: str, path: str | Path, *, top: int = 40) -> Path:
    """Bar chart of detectors per concept in ``layer``, colored by category.

    Parameters
    ----------
    result
        A :class:`~dissect.netdissect.DissectionResult`.
    layer
        The layer to draw.
    path
        PNG file to write.
    top
        Show at most this many concepts (the most detected).

    Returns
    -------
    pathlib.Path
    """
    plt = _pyplot()
    detectors = result.detectors(layer)
    counts = Counter((u.concept, u.category) for u in detectors).most_common(top)
    colors = category_colors(result.categories)
    width = max(4.0, 0.28 * len(counts) + 1.5)
    fig, ax = plt.subplots(figsize=(width, 3.2), dpi=110)
    if counts:
        names = [c for (c, _), _ in counts]
        ax.bar(range(len(counts)), [n for _, n in counts],
               color=[colors[cat] for (_, cat), _ in counts])
        ax.set_xticks(range(len(counts)), names, rotation=90, fontsize=8)
        ax.set_xlim(-0.75, max(len(counts), 10) - 0.25)  # a few concepts: narrow bars
        seen = list(dict.fromkeys(cat for (_, cat), _ in counts))
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in seen]
        ax.legend(handles, seen, fontsize=8, frameon=False, loc="upper right")
    else:
        ax.text(0.5, 0.5, f"no unit has IoU > {result.iou_threshold}", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.set_ylabel("detectors")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{layer}: {len(detectors)} detectors, "
                 f"{len({u.concept for u in detectors})} unique concepts", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(plt, fig, path)


def category_chart(result: Any, path: str | Path) -> Path:
    """Stacked bars: detectors of each category, one bar per layer.

    Parameters
    ----------
    result
        A :class:`~dissect.netdissect.DissectionResult`.
    path
        PNG file to write.

    Returns
    -------
    pathlib.Path
    """
    plt = _pyplot()
    colors = category_colors(result.categories)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(result.layers) + 2), 3.2), dpi=110)
    bottom = [0] * len(result.layers)
    for cat in result.categories:
        values = [sum(u.category == cat for u in result.detectors(layer))
                  for layer in result.layers]
        ax.bar(result.layers, values, bottom=bottom, color=colors[cat], label=cat)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("detectors")
    ax.set_title("detectors per category per layer", fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8, frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(plt, fig, path)
