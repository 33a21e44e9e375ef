"""HTML of the report's pages. Every string that comes from data goes through :func:`esc`."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .._plumbing.paths import safe_name
from .._plumbing.token_grid import TokenGrid
from .figures import category_colors


def esc(value: Any) -> str:
    """HTML-escape ``str(value)``, quotes included (safe in text and attribute values)."""
    return html.escape(str(value), quote=True)


def slug(layer: str) -> str:
    """A file-name-safe, collision-free form of a layer name (``features.13`` stays
    ``features.13``; see :func:`dissect._plumbing.paths.safe_name`)."""
    return safe_name(layer)


def layer_page_name(layer: str) -> str:
    """File name of a layer's page."""
    return f"layer-{slug(layer)}.html"


def page(title: str, body: str, nav: Sequence[tuple[str, str]], *, script: bool = False) -> str:
    """A complete HTML document with the shared header, navigation and stylesheet."""
    links = "".join(f'<a href="{esc(href)}">{esc(text)}</a>' for text, href in nav)
    js = '<script src="assets/gallery.js"></script>' if script else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><link rel=\"stylesheet\" href=\"assets/report.css\">"
        f"</head><body><header><h1>{esc(title)}</h1><nav>{links}</nav></header>"
        f"<main>{body}</main>{js}</body></html>\n"
    )


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (for cells built from escaped parts)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    cell = (lambda v: str(v)) if raw else esc
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>' \
           "</table></div>"


def figure(src: str, alt: str) -> str:
    """An ``<img>`` of a chart."""
    return f'<p><img class="figure" src="{esc(src)}" alt="{esc(alt)}"></p>'


def token_note(layout: TokenGrid | None) -> str:
    """How a layer was read from token outputs, in words (``"tokens: 1 prefix + 7x7"``,
    ``"channels-last map"``), or ``""`` for a layer stored as its module returned it."""
    if layout is None:
        return ""
    if layout.channels_last:
        return "channels-last map (B, H, W, C)"
    grid = "square grid" if layout.grid is None else f"{layout.grid[0]}x{layout.grid[1]}"
    return f"tokens: {layout.prefix} prefix + {grid}"


def _layer_cell(layer: str, layout: TokenGrid | None, link: bool) -> str:
    name = f'<a href="{esc(layer_page_name(layer))}">{esc(layer)}</a>' if link else esc(layer)
    note = token_note(layout)
    return name + (f' <span class="meta">({esc(note)})</span>' if note else "")


def detector_table(result: Any, tokens: dict[str, TokenGrid] | None = None) -> str:
    """Detectors per category per layer, with unit counts and unique concepts; a layer read
    from token outputs (``tokens``: its layout) says so."""
    rows = []
    for layer in result.layers:
        det = result.detectors(layer)
        per_cat = Counter(u.category for u in det)
        link = _layer_cell(layer, (tokens or {}).get(layer), link=True)
        rows.append([link, result.iou(layer).shape[0], len(det), len({u.concept for u in det})]
                    + [per_cat[c] for c in result.categories])
    return table(["layer", "units", "detectors", "unique concepts"] + list(result.categories),
                 rows, raw=True) if rows else ""


def probe_table(probes: Any, tokens: dict[str, TokenGrid] | None = None) -> str:
    """Train, test, control and selectivity per layer; flagged layers marked; a layer read
    from token outputs (``tokens``: its layout) says so."""
    rows = []
    for layer in probes.layers:
        r = probes[layer]
        flag = '<span class="flag">flagged</span>' if getattr(r, "flagged", False) else ""
        rows.append([_layer_cell(layer, (tokens or {}).get(layer), link=False), r.n_features,
                     f"{r.train_accuracy:.3f}", f"{r.test_accuracy:.3f}",
                     f"{r.control_train_accuracy:.3f}", f"{r.control_test_accuracy:.3f}",
                     f"{r.selectivity:+.3f}", f"{r.chance:.3f}", flag])
    return table(["layer", "features", "train", "test", "control train", "control test",
                  "selectivity", "chance", ""], rows, raw=True)


def unit_card(unit: Any, images: dict[str, str], color: str,
              deconv_caption: str = "deconvnet patches", formula: Any = None) -> str:
    """One unit's card: label, category, IoU, threshold, its compositional explanation
    (``formula``: an :class:`~dissect.netdissect.Explanation`, if one was computed), its
    images."""
    det = "1" if unit.is_detector else "0"
    cls = "card detector" if unit.is_detector else "card"
    parts = [
        f'<article class="{cls}" style="--cat: {esc(color)}" data-unit="{unit.unit}" '
        f'data-iou="{unit.iou:.6f}" data-concept="{esc(unit.concept)}" '
        f'data-category="{esc(unit.category)}" data-detector="{det}">',
        f'<h3><span>unit {unit.unit}</span><span class="label">{esc(unit.concept)}</span></h3>',
        f'<div class="meta"><span class="chip">{esc(unit.category)}</span> IoU {unit.iou:.3f}'
        + (f" &middot; threshold {unit.threshold:.4g}" if np.isfinite(unit.threshold) else "")
        + "</div>",
    ]
    if formula is not None:
        parts.append(f'<div class="meta formula">formula <b>{esc(formula.formula)}</b> IoU '
                     f"{formula.iou:.3f}</div>")
    if "top" in images:
        parts.append(f'<img src="{esc(images["top"])}" loading="lazy" '
                     f'alt="top images of unit {unit.unit}">')
    actmax = "activation maximization"
    if "actmax_value" in images:
        actmax += f" (reaches {images['actmax_value']})"
    extra = [(k, t) for k, t in (("actmax", actmax), ("deconv", deconv_caption))
             if k in images]
    if extra:
        parts.append('<div class="extra">' + "".join(
            f'<figure><img src="{esc(images[k])}" loading="lazy" alt="{esc(t)} of unit '
            f'{unit.unit}"><figcaption>{esc(t)}</figcaption></figure>' for k, t in extra)
            + "</div>")
    parts.append("</article>")
    return "".join(parts)


def ablation_section(result: Any, layer: str, each: Any, sets: Sequence[Any] = (),
                     rows: int = 12, k: int = 3) -> str:
    """The layer page's ablation section: for the layer's top detectors that were ablated
    (``each``: an :class:`~dissect.ablation.AblationResult` with one row per unit, or None),
    the mean drop over classes and the classes that lose most; then one line per set removed
    at once (``sets``: ``removal="set"`` or ``"keep"`` results)."""
    parts = []
    if each is not None:
        done = set(each.units)
        detectors = sorted((u for u in result.units(layer) if u.is_detector and u.unit in done),
                           key=lambda u: -u.iou)[:rows]
        body = []
        for u in detectors:
            drop = each.drop[each.row(u.unit)]
            mean = float(np.nanmean(drop)) if np.isfinite(drop).any() else float("nan")
            top = ", ".join(f"{c} ({drop[list(each.classes).index(c)]:+.3f})"
                            for c in each.top(u.unit, k))
            body.append([str(u.unit), u.concept, f"{u.iou:.3f}", f"{mean:+.4f}", top])
        what = (f"removing each unit ({each.mode}) and measuring {each.metric} per class over "
                f"{len(each.classes)} classes")
        parts.append(f"<h2>Ablation</h2><p class=\"meta\">The top detectors' effect: "
                     f"{esc(what)}; drop = baseline - ablated (positive: the class lost).</p>")
        parts.append(table(["unit", "concept", "IoU", "mean drop", "classes that lose most"],
                           body) if body else
                     '<p class="meta">No detector of this layer was ablated.</p>')
    for r in sets:
        drop = r.drop[0]
        mean = float(np.nanmean(drop)) if np.isfinite(drop).any() else float("nan")
        name = r.settings.get("concept")
        what = (f"every detector of {name!r}" if name else
                f"all but {len(r.units)} units" if r.removal == "keep" else
                f"{len(r.units)} units at once")
        top = ", ".join(str(c) for c in r.top(None, k))
        parts.append(f'<p class="meta">Removing {esc(what)} (units {esc(r.units[:12])}'
                     f"{' ...' if len(r.units) > 12 else ''}): mean {esc(r.metric)} drop "
                     f"{mean:+.4f}; classes that lose most: {esc(top)}.</p>")
    return "".join(parts)


def layer_body(result: Any, layer: str, images: dict[int, dict[str, str]], chart: str,
               deconv_caption: str = "deconvnet patches",
               layout: TokenGrid | None = None, formulas: dict[int, Any] | None = None,
               ablation: str = "") -> str:
    """A layer page: the concept chart, the controls, the gallery of unit cards. ``layout``:
    how the layer was read from token outputs, if it was (said above the gallery);
    ``formulas``: each unit's compositional explanation, shown on its card; ``ablation``: the
    HTML of the ablation section (:func:`ablation_section`), if any."""
    formulas = formulas or {}
    colors = category_colors(result.categories)
    units = sorted(result.units(layer), key=lambda u: -u.iou)
    shown = [u for u in units if u.unit in images] or units
    cards = "".join(unit_card(u, images.get(u.unit, {}), colors[u.category], deconv_caption,
                              formulas.get(u.unit)) for u in shown)
    options = "".join(f'<option value="{esc(c)}">{esc(c)}</option>' for c in result.categories)
    note = "" if len(shown) == len(units) else \
        f" Showing the {len(shown)} units with the highest IoU of {len(units)}."
    controls = (
        '<div class="controls">'
        '<label>sort <select id="sort"><option value="iou-desc">IoU, highest first</option>'
        '<option value="iou-asc">IoU, lowest first</option>'
        '<option value="unit-asc">unit number</option>'
        '<option value="concept-asc">concept</option>'
        '<option value="category-asc">category</option></select></label>'
        f'<label>category <select id="category"><option value="">all</option>{options}'
        "</select></label>"
        '<label>concept or unit <input type="search" id="filter" placeholder="e.g. red"></label>'
        '<label><input type="checkbox" id="detectors"> detectors only</label>'
        '<span id="count" class="meta"></span></div>'
    )
    det = result.detectors(layer)
    read = ""
    if layout is not None:
        parts = "its patch tokens, prefix tokens left out," if layout.prefix else "its map"
        read = (f" Read from token outputs ({esc(token_note(layout))}): a unit is a channel of "
                f"{parts} laid out on the patch grid like a convolution's map.")
    how = (f"threshold quantile {result.quantile}.{note}{read} Top images: the region where "
           "the unit's upsampled activation exceeds its threshold is outlined, the rest dimmed.")
    if result.meta.get("source") == "netdissect-csv":  # DissectionResult.from_netdissect_csv
        how = ("read from NetDissect result CSVs: only each unit's best concept per category "
               f"is known; no thresholds or images.{note}")
    return (
        f'<p class="meta">{len(units)} units, {len(det)} detectors (IoU &gt; '
        f"{result.iou_threshold}), {how}</p>"
        + figure(chart, f"detectors per concept in {layer}") + ablation
        + controls + f'<div id="gallery" class="gallery">{cards}</div>'
    )


def attribution_body(entries: Sequence[dict[str, Any]]) -> str:
    """The attribution page: each photograph, its prediction, one overlay per method."""
    if not entries:
        return "<p>No attribution maps in these results.</p>"
    blocks = []
    for e in entries:
        label = f' {esc(e["label"])}' if e.get("label") else ""
        figs = []
        if e.get("image"):
            figs.append(f'<figure><img src="{esc(e["image"])}" alt="{esc(e["name"])}">'
                        "<figcaption>input</figcaption></figure>")
        for method, src in e.get("maps", {}).items():
            figs.append(f'<figure><img src="{esc(src)}" loading="lazy" alt="{esc(method)} of '
                        f'{esc(e["name"])}"><figcaption>{esc(method)}</figcaption></figure>')
        prob = f" (p = {float(e['prob']):.2f})" if e.get("prob") is not None else ""
        blocks.append(
            f'<section class="photo"><h2>{esc(e["name"])}: class {esc(e.get("target", ""))}'
            f"{label}{prob}</h2>{''.join(figs)}</section>"
        )
    return ('<p class="meta">Integrated Gradients and occlusion: absolute attribution; '
            "Grad-CAM: positive part. Brighter (warmer) means more credit for the predicted "
            f'class.</p><div class="photos">{"".join(blocks)}</div>')


def layers_body(figures: Sequence[tuple[str, str, str]], nearest: dict[str, Any] | None) -> str:
    """The Layers page: ``figures`` as ``(heading, src, alt)`` (CKA heatmap, intrinsic
    dimension, relative contrast, embedding), then each query image's nearest examples in
    the layers ``nearest`` (as ``dissect similarity`` writes it; images relative to the page)
    lists."""
    parts = [f"<h2>{esc(heading)}</h2>{figure(src, alt)}" for heading, src, alt in figures]
    if nearest:
        images = nearest.get("images", {})
        index = nearest.get("index", {})
        for entry in nearest.get("entries", []):
            parts.append(f"<h2>Nearest examples in {esc(entry['layer'])} "
                         f"({esc(nearest.get('metric', 'cosine'))} distance)</h2>")
            rows = []
            for query, found, dist in zip(entry["queries"], entry["rows"], entry["distances"],
                                          strict=True):
                cells = [_thumb(images, index, query, "query")]
                cells += [_thumb(images, index, row, f"d = {d:.3f}")
                          for row, d in zip(found, dist, strict=True)]
                rows.append(cells)
            header = ["query"] + [f"#{i + 1}" for i in range(len(entry["rows"][0]))]
            parts.append(table(header, rows, raw=True))
    return "".join(parts) or "<p>No layer results in this folder.</p>"


def _thumb(images: dict[str, str], index: dict[str, int], row: int, caption: str) -> str:
    item = index.get(str(row), row)
    src = images.get(str(row))
    img = (f'<img src="{esc(src)}" loading="lazy" alt="item {esc(item)}"><br>'
           if src else "")
    return f"{img}item {esc(item)}<br>{esc(caption)}"
