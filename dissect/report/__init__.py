"""The layer-analysis report: a static, self-contained HTML site rendered from saved results.

:func:`write_report` reads what an analysis run left in a results folder and never recomputes
anything. Every part is optional; the report shows what is there:

==================================  ============================================================
``run.json``                        model, dataset, layers and settings of the run
``netdissect.json``                 :meth:`DissectionResult.to_json <dissect.netdissect.
                                    DissectionResult.to_json>` (its ``meta["tokens"]``, when
                                    present, says which layers were read from token outputs)
``units/<layer>/unit_K.png``        top images with the active region outlined
                                    (:func:`render_unit_images`)
``actmax/<layer>/unit_K.png``       activation-maximization images
``actmax/*.json``                   :meth:`ActmaxResult.to_json <dissect.actmax.ActmaxResult.
                                    to_json>` (values reached; images drawn when no PNG is there)
``deconv/<layer>/unit_K.png``       deconvnet patches
``explanations/<layer>.json``       ``dissect explain``: each unit's compositional explanation
                                    (:class:`~dissect.netdissect.ExplanationResult`), on its card
``ablation/*.json``                 ``dissect ablate``: :class:`~dissect.ablation.AblationResult`
                                    per layer, the top detectors' effect on its page
``probes.json``                     :meth:`ProbeResult.to_json <dissect.probes.ProbeResult.to_json>`
``attribution/attribution.json``    photographs and their attribution overlays
``layers/*.json``                   ``dissect similarity``: CKA (:class:`~dissect.similarity.
                                    SimilarityResult`), intrinsic dimension and relative contrast
                                    curves, a PCA embedding (``layers/labels.npy`` colours it) and
                                    nearest examples (``layers/nearest.json``, thumbnails)
==================================  ============================================================

The site goes to ``RESULTS/report/`` (``index.html``, one page per layer, ``attribution.html``),
with its images copied next to it, so the folder can be moved or zipped on its own. No network,
no CDN: one stylesheet and one small script ship with the package.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from .._plumbing.deprecation import renamed_kwargs
from .._plumbing.images import write_png
from .._plumbing.paths import safe_name, unit_image_path
from .._plumbing.token_grid import TokenGrid
from ..errors import DissectError
from . import pages
from .figures import category_chart, concept_bar_chart
from .unit_images import outline_strip, render_unit_images

__all__ = ["outline_strip", "render_unit_images", "unit_image_path", "write_report"]

log = logging.getLogger(__name__)

UNIT_IMAGE_KINDS = {"top": "units", "actmax": "actmax", "deconv": "deconv"}
POOL_WORDS = {  # a probe's pool= in words
    "mean": "each layer's mean over space (over the patch tokens for a layer read from tokens)",
    "max": "each layer's maximum over space", "cls": "each layer's class token (pool='cls')",
    None: "each layer's whole map, flattened"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DissectError(f"cannot read {path}: {exc}") from exc


def _copy(src: Path, report: Path, rel: str) -> str:
    """Copy ``src`` to ``report/rel`` (when newer) and return ``rel`` for links."""
    dst = report / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
        shutil.copy2(src, dst)
    return rel


def _load_actmax(results: Path) -> list[Any]:
    """Every activation-maximization result saved in ``results/actmax/*.json``."""
    from ..actmax import ActmaxResult

    return [ActmaxResult.from_json(p) for p in sorted((results / "actmax").glob("*.json"))]


def _unit_images(results: Path, report: Path, layer: str,
                 actmax: list[Any]) -> dict[int, dict[str, str]]:
    """Per unit of ``layer``: the report-relative paths of its images by kind (and
    ``"actmax_value"``, the objective its activation-maximization image reached)."""
    images: dict[int, dict[str, str]] = {}
    for found in actmax:  # images saved inside results, drawn here when no PNG was written
        for owner, tile, value in zip(found.units, found.images, found.values, strict=True):
            if owner is None or owner[0] != layer:
                continue
            unit = owner[1]
            entry = images.setdefault(unit, {})
            rel = f"img/actmax/{pages.slug(layer)}/unit_{unit:04d}.png"
            if not unit_image_path(results / "actmax", layer, unit).exists():
                write_png(report / rel, tile)
                entry["actmax"] = rel
            entry["actmax_value"] = f"{value:.3g}"
    for kind, folder in UNIT_IMAGE_KINDS.items():
        for src in sorted(unit_image_path(results / folder, layer, 0).parent.glob("unit_*.png")):
            try:
                unit = int(src.stem.removeprefix("unit_"))
            except ValueError:
                continue
            rel = f"img/{folder}/{pages.slug(layer)}/{src.name}"
            images.setdefault(unit, {})[kind] = _copy(src, report, rel)
    return images


def _load_probes(results: Path) -> Any:
    path = results / "probes.json"
    if not path.exists():
        return None
    from ..probes import ProbeResult

    return ProbeResult.from_json(path)


def _load_explanations(results: Path, layer: str) -> dict[int, Any]:
    """``{unit: Explanation}`` from ``results/explanations/<layer>.json`` (``dissect explain``),
    or nothing."""
    from ..netdissect import load_explanations

    path = results / "explanations" / f"{safe_name(layer)}.json"
    if not path.exists():
        return {}
    return {e.unit: e for e in load_explanations(path)}


def _load_ablation(results: Path, layer: str) -> tuple[Any, list[Any]]:
    """The ablation results of ``layer`` in ``results/ablation/`` (``dissect ablate``): the
    one-row-per-unit result (or None) and the sets removed at once."""
    from ..ablation import AblationResult

    folder = results / "ablation"
    if not folder.is_dir():
        return None, []
    found = [AblationResult.from_json(p) for p in sorted(folder.glob("*.json"))]
    mine = [r for r in found if r.layer == layer]
    each = next((r for r in mine if r.removal == "each"), None)
    return each, [r for r in mine if r.removal != "each"]


def _token_layouts(found: Any, source: Path) -> dict[str, TokenGrid]:
    """``{layer: TokenGrid}`` from a result's record of its token layers (``meta["tokens"]``
    of Network Dissection, ``settings["tokens"]`` of probes): JSON strings or dicts."""
    if not found:
        return {}
    if not isinstance(found, dict):
        raise DissectError(f"{source}: its token layouts are {type(found).__name__}, not "
                           "{layer: layout}; rewrite it with the analysis that made it")
    out = {}
    for layer, layout in found.items():
        try:
            out[str(layer)] = TokenGrid.from_json(
                layout if isinstance(layout, (str, bytes)) else json.dumps(layout))
        except (DissectError, TypeError) as exc:
            raise DissectError(f"{source}: the token layout of layer {layer!r} is not "
                               f"readable ({exc}); rewrite it with the analysis that made "
                               "it") from exc
    return out


def _overview(run: dict[str, Any], result: Any) -> str:
    rows = [(k, run[k]) for k in ("model", "dataset", "images", "device") if k in run]
    layers = run.get("layers") or (result.layers if result is not None else [])
    if layers:
        rows.append(("layers", ", ".join(layers)))
    if result is not None:
        how = ("read from NetDissect result CSVs" if result.meta.get("source") ==
               "netdissect-csv" else f"quantile {result.quantile}")
        rows.append(("Network Dissection", f"{how}, detector IoU > {result.iou_threshold}"))
    return pages.table(["", ""], rows)


def _layers_page(results: Path, report: Path) -> str:
    """The Layers page from ``results/layers`` (figures re-drawn from the saved results)."""
    import numpy as np

    from ..geometry import Embedding, LayerCurve
    from ..similarity import SimilarityResult

    src = results / "layers"
    figures_dir = report / "figures"
    figs = []
    cka = SimilarityResult.from_json(src / "similarity.json")
    figs.append(("Layer similarity (CKA)", cka.plot(figures_dir / "similarity.png"),
                 "CKA between every pair of layers"))
    for name, heading in (("intrinsic_dimension", "Intrinsic dimension (TwoNN) across depth"),
                          ("relative_contrast", "Distance concentration across depth")):
        if (src / f"{name}.json").exists():
            curve = LayerCurve.from_json(src / f"{name}.json")
            figs.append((heading, curve.plot(figures_dir / f"{name}.png"), heading))
    if (src / "embedding.json").exists():
        emb = Embedding.from_json(src / "embedding.json")
        labels = np.load(src / "labels.npy") if (src / "labels.npy").exists() else None
        names = (_read_json(src / "label_names.json")
                 if (src / "label_names.json").exists() else None)
        figs.append((f"{emb.method.upper()} of {emb.layer}",
                     emb.plot(labels=labels, path=figures_dir / "embedding.png", names=names),
                     f"2-D embedding of {emb.layer}"))
    figures = [(h, str(Path(p).relative_to(report)), alt) for h, p, alt in figs]
    nearest = _read_json(src / "nearest.json") if (src / "nearest.json").exists() else None
    if nearest:
        nearest["images"] = {row: _copy(src / rel, report, f"img/layers/{rel}")
                             for row, rel in nearest.get("images", {}).items()}
    return pages.layers_body(figures, nearest)


@renamed_kwargs(out="out_dir")
def write_report(results: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render the report of a results folder.

    Parameters
    ----------
    results
        A folder written by ``dissect demo``, ``dissect netdissect`` (and friends): see the
        module documentation for the files it may hold.
    out_dir
        Where to write the site (default ``results/report``). (``out=`` is a deprecated alias,
        for one release.)

    Returns
    -------
    pathlib.Path
        The ``index.html`` written.

    Raises
    ------
    DissectError
        When the folder does not exist or holds no result the report can show.
    """
    results = Path(results)
    if not results.is_dir():
        raise DissectError(f"results folder {results} does not exist")
    report = Path(out_dir) if out_dir is not None else results / "report"
    run = _read_json(results / "run.json") if (results / "run.json").exists() else {}
    result = None
    if (results / "netdissect.json").exists():
        from ..netdissect import DissectionResult

        result = DissectionResult.from_json(results / "netdissect.json")
    tokens = _token_layouts(result.meta.get("tokens"), results / "netdissect.json") \
        if result is not None else {}
    probes = _load_probes(results)
    actmax = _load_actmax(results)
    attribution_file = results / "attribution" / "attribution.json"
    attributions = _read_json(attribution_file) if attribution_file.exists() else []
    has_layers = (results / "layers" / "similarity.json").exists()
    if result is None and probes is None and not attributions and not has_layers:
        raise DissectError(
            f"{results} holds no results (netdissect.json, probes.json, "
            "attribution/attribution.json or layers/similarity.json): run `dissect demo`, "
            "`dissect netdissect`, `dissect probe` or `dissect similarity` with --out "
            "pointing there first"
        )
    report.mkdir(parents=True, exist_ok=True)
    assets = resources.files(__package__) / "assets"
    (report / "assets").mkdir(exist_ok=True)
    for name in ("report.css", "gallery.js"):
        (report / "assets" / name).write_text(assets.joinpath(name).read_text())

    title = f"torch-dissect report: {run.get('model', results.name)}"
    nav = [("overview", "index.html")]
    if result is not None:
        nav += [(layer, pages.layer_page_name(layer)) for layer in result.layers]
    if attributions:
        nav.append(("attribution", "attribution.html"))
    if has_layers:
        nav.append(("layers", "layers.html"))

    body = [_overview(run, result)]
    method = run.get("deconv_method", "deconvnet")
    deconv_caption = "deconvnet patches" if method == "deconvnet" else f"{method} patches"
    if result is not None:
        body.append("<h2>Network Dissection: detectors per category</h2>")
        body.append(pages.detector_table(result, tokens))
        body.append(pages.figure(str(category_chart(result, report / "figures" / "categories.png")
                                     .relative_to(report)), "detectors per category per layer"))
        deepest = result.layers[-1]
        chart = concept_bar_chart(result, deepest, report / "figures" / "concepts-index.png")
        body.append(f"<h2>Unique detectors per concept in {pages.esc(deepest)}</h2>")
        body.append(pages.figure(str(chart.relative_to(report)),
                                 f"detectors per concept in {deepest}"))
        for layer in result.layers:
            chart = concept_bar_chart(result, layer,
                                      report / "figures" / f"concepts-{pages.slug(layer)}.png")
            html = pages.layer_body(result, layer, _unit_images(results, report, layer, actmax),
                                    str(chart.relative_to(report)), deconv_caption,
                                    tokens.get(layer), _load_explanations(results, layer),
                                    pages.ablation_section(result, layer,
                                                           *_load_ablation(results, layer)))
            (report / pages.layer_page_name(layer)).write_text(
                pages.page(f"{layer}: units", html, nav, script=True))
    if probes is not None:
        body.append("<h2>Linear probes: accuracy per layer</h2>")
        pool = probes.settings.get("pool", "mean")
        if pool in POOL_WORDS:
            body.append(f'<p class="meta">Features: {pages.esc(POOL_WORDS[pool])}.</p>')
        plot = probes.plot(report / "figures" / "probes.png")
        body.append(pages.figure(str(Path(plot).relative_to(report)), "probe accuracy vs depth"))
        body.append(pages.probe_table(probes, _token_layouts(
            probes.settings.get("tokens"), results / "probes.json")))
    if attributions:
        entries = []
        for e in attributions:
            e = dict(e)
            for key in ("image",):
                if e.get(key):
                    e[key] = _copy(results / e[key], report, f"img/{e[key]}")
            e["maps"] = {m: _copy(results / p, report, f"img/{p}")
                         for m, p in e.get("maps", {}).items()}
            entries.append(e)
        (report / "attribution.html").write_text(
            pages.page("attribution maps", pages.attribution_body(entries), nav))
        methods = list(dict.fromkeys(m for e in entries for m in e["maps"]))
        body.append('<h2>Attribution maps</h2><p><a href="attribution.html">'
                    f"{len(entries)} photographs</a>: {pages.esc(', '.join(methods))}.</p>")
    if has_layers:
        (report / "layers.html").write_text(
            pages.page("layers: similarity and geometry", _layers_page(results, report), nav))
        body.append('<h2>Layers</h2><p><a href="layers.html">Layer similarity (CKA), '
                    "intrinsic dimension, an embedding and nearest examples</a>.</p>")
    index = report / "index.html"
    index.write_text(pages.page(title, "".join(body), nav))
    log.info("wrote the report to %s", index)
    return index
