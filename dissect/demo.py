"""The embedded demo: every analysis of the toolkit on the real ImageNet MobileNetV2, offline.

:func:`run_demo` is what ``dissect demo`` (and ``make demo``) runs. On a concept dataset drawn
by :class:`~dissect.datasets.SyntheticConcepts` and on the real photographs that ship with
scikit-image it

1. captures four layers to HDF5 (:func:`~dissect.hooks.capture`);
2. runs Network Dissection on each (:func:`~dissect.netdissect.dissect`) and draws every shown
   unit's top images with the active region outlined;
3. renders activation-maximization images (:mod:`dissect.actmax`) and deconvnet patches
   (:mod:`dissect.deconvnet`) for each layer's best detectors;
4. trains linear probes per layer on the dataset's targets (:mod:`dissect.probes`), and
   compares the layers: CKA, intrinsic dimension, a PCA and nearest examples
   (:func:`dissect.geometry.write_layer_results`);
5. explains the photographs' top-1 classes with Integrated Gradients, Grad-CAM and occlusion
   (:mod:`dissect.attribution`);

and writes the results folder :func:`dissect.report.write_report` renders.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._plumbing.deprecation import renamed_kwargs
from ._plumbing.device import prepare_model, resolve_device

log = logging.getLogger(__name__)

LAYERS = ["features.3", "features.6", "features.13", "features.17"]
GRAD_CAM_LAYER = "features.18"
# MobileNetV2 has no max-pooling, so its deconvnet projections depend on an image only through
# the maximum's position and value (alike, checkered gray); guided backprop shows the image.
DECONV_METHOD = "guided"


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo is. :meth:`full` takes about a minute on 2 CPU cores; :meth:`fast`
    a few seconds."""

    images: int
    image_size: int
    gallery_units: int
    k: int
    best_units: int
    actmax_size: int
    actmax_steps: int
    patches: int
    ig_steps: int
    occlusion_window: int
    photos: int

    @classmethod
    def full(cls) -> DemoSettings:
        """About 1,000 concept images, 48 units per layer shown, 4 visualized."""
        return cls(images=1000, image_size=112, gallery_units=48, k=5, best_units=4,
                   actmax_size=112, actmax_steps=160, patches=9, ig_steps=32,
                   occlusion_window=56, photos=6)

    @classmethod
    def fast(cls) -> DemoSettings:
        """A small run that still exercises every step (used by the tests)."""
        return cls(images=96, image_size=64, gallery_units=8, k=3, best_units=2,
                   actmax_size=48, actmax_steps=8, patches=3, ig_steps=4,
                   occlusion_window=112, photos=2)


class _Steps:
    """Times each step and logs it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        log.info("%s ...", name)
        start = time.perf_counter()
        value = fn()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        log.info("%s: done in %.1f s", name, self.seconds[name])
        return value


@renamed_kwargs(out="out_dir")
def run_demo(
    out_dir: str | Path,
    *,
    fast: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every analysis on the real MobileNetV2 and write a results folder.

    Parameters
    ----------
    out_dir
        Results folder (created). ``out_dir/report/index.html`` is written at the end.
        (``out=`` is a deprecated alias, for one release.)
    fast
        A smaller run (:meth:`DemoSettings.fast`).
    device, batch_size, num_workers, progress
        As everywhere in the toolkit.

    Returns
    -------
    dict
        What was written to ``out_dir/run.json``: the settings, the photographs'
        predictions, the seconds each step took, and ``"report"``, the path of the report's
        index page; and, not written to the file, ``"summary"`` and ``"probes"``, the
        dissection's and the probes' result tables (``dissect demo`` prints them on stdout).
    """
    from .datasets import SampleImages, SyntheticConcepts
    from .hooks import capture
    from .models import load_model
    from .netdissect import dissect
    from .report import render_unit_images, write_report

    settings = DemoSettings.fast() if fast else DemoSettings.full()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    model, transform = load_model("mobilenet_v2-imagenet")
    model.eval()
    # placed once, weights hashed once for every analysis below (dissect.prepare_model)
    model = prepare_model(model, resolve_device(device))
    dev = model.device
    data = SyntheticConcepts(settings.images, size=settings.image_size, seed=0,
                             transform=transform.without_resize())
    store = steps.run("capture", lambda: capture(
        model, data, LAYERS, out / "activations.h5", batch_size=batch_size, device=dev,
        num_workers=num_workers, progress=progress, overwrite=True,
        dataset=f"synthetic:{settings.images}"))
    result = steps.run("network dissection", lambda: dissect(
        store, data, LAYERS, batch_size=batch_size, device=dev, progress=progress,
        num_workers=num_workers))
    result.to_json(out / "netdissect.json")
    result.to_csv(out)
    steps.run("unit images", lambda: render_unit_images(
        result, store, data, out / "units", units=settings.gallery_units, k=settings.k,
        progress=progress))
    best = {layer: [u.unit for u in sorted(result.units(layer), key=lambda u: -u.iou)]
            [:settings.best_units] for layer in LAYERS}
    steps.run("activation maximization",
              lambda: _actmax(model, transform, best, out / "actmax", settings, dev, progress))
    steps.run("deconvnet patches",
              lambda: _deconv(model, transform, data, store, best, out / "deconv", settings,
                              dev, progress))
    probes = steps.run("linear probes", lambda: _probes(store, data, out, dev, progress))
    steps.run("layer similarity", lambda: _layers(store, data, out, dev, progress))
    photos = SampleImages(transform)
    predictions = steps.run("attribution maps", lambda: _attributions(
        model, transform, photos, out / "attribution", settings, dev, batch_size, progress))
    store.close()
    run = {
        "model": "MobileNetV2, ImageNet weights (torchvision IMAGENET1K_V1)",
        "dataset": f"SyntheticConcepts({settings.images}, size={settings.image_size}) and "
                   f"{settings.photos} real photographs",
        "images": settings.images,
        "layers": LAYERS,
        "device": str(dev),
        "fast": fast,
        "deconv_method": DECONV_METHOD,
        "predictions": predictions,
        "seconds": steps.seconds,
    }
    (out / "run.json").write_text(json.dumps(run, indent=1))
    run["report"] = str(steps.run("report", lambda: write_report(out)))
    run["summary"] = result.summary()
    run["probes"] = probes.summary()
    return run


def _actmax(model, transform, best, directory, settings, dev, progress) -> None:
    from .actmax import channel, visualize

    objectives = [channel(layer, u) for layer, units in best.items() for u in units]
    result = visualize(model, objectives, size=settings.actmax_size, steps=settings.actmax_steps,
                       device=dev, progress=progress, normalize=transform.normalize,
                       return_result=True)
    result.save_unit_images(directory)
    result.to_json(directory / "actmax.json")


def _deconv(model, transform, data, store, best, directory, settings, dev, progress) -> None:
    from .deconvnet import save_unit_grids, top_patches

    for layer, units in best.items():
        patches = top_patches(model, data, layer, units, k=settings.patches, store=store,
                              method=DECONV_METHOD, device=dev, progress=progress)
        save_unit_grids(patches, directory, denormalize=transform)


def _layers(store, data, out, dev, progress) -> None:
    from .geometry import write_layer_results

    write_layer_results(store, out, LAYERS, dataset=data, device=dev, progress=progress)


def _probes(store, data, out, dev, progress):
    from .probes import probe

    result = probe(store, data.targets.numpy(), LAYERS, device=dev, progress=progress)
    result.to_json(out / "probes.json")
    result.to_csv(out / "probes.csv")
    return result


def _attributions(model, transform, photos, directory, settings, dev, batch_size,
                  progress) -> list[dict[str, Any]]:
    from .attribution import grad_cam, integrated_gradients, occlusion, overlay, save_png
    from .models import imagenet_categories

    n = min(settings.photos, len(photos))
    x = torch.stack([photos[i]["image"] for i in range(n)]).to(dev)
    with torch.inference_mode():
        probs = model.module(x).softmax(1)
    targets = probs.argmax(1).tolist()
    cats = imagenet_categories()
    x_cl = x.contiguous(memory_format=torch.channels_last)  # faster CPU kernels, same result
    w = settings.occlusion_window
    maps = {
        "integrated gradients": integrated_gradients(
            model, x_cl, targets, steps=settings.ig_steps, batch_size=batch_size,
            device=dev, progress=progress),
        "grad-cam": grad_cam(model, x, targets, GRAD_CAM_LAYER, device=dev),
        "occlusion": occlusion(model, x_cl, targets, window=(3, w, w), stride=(3, w // 2, w // 2),
                               batch_size=batch_size * 2, device=dev, progress=progress),
    }
    pictures = transform.denormalize(x).clamp(0, 1)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        name = photos.names[i]
        save_png(directory / f"{name}.png", pictures[i])
        files = {}
        for method, amap in maps.items():
            file = directory / f"{name}_{method.replace(' ', '-')}.png"
            sign = "positive" if method == "grad-cam" else "absolute"
            save_png(file, overlay(pictures[i], amap[i], sign=sign))
            files[method] = f"attribution/{file.name}"
        t = targets[i]
        entries.append({"name": name, "target": t, "label": cats[t],
                        "prob": round(float(probs[i, t]), 4), "image": f"attribution/{name}.png",
                        "maps": files})
    (directory / "attribution.json").write_text(json.dumps(entries, indent=1))
    return [{"name": e["name"], "label": e["label"], "prob": e["prob"]} for e in entries]
