"""Benchmark compositional explanations: ``explain()`` on ResNet-18 ``layer4``, against a target.

What it measures
----------------
Data: ``write_broden(SyntheticConcepts(N, size=224, seed=0))`` (JPEG images, 112 px label PNGs,
like broden1_224), read back with ``Broden``, written once per run into a temporary folder.
Layer: ResNet-18 (torchvision, seeded random init, eval) ``layer4``, 512 units of 7x7, captured
over those images with ``capture(..., dtype="float32")`` and the transform
``Preprocess().without_resize()``.

1. **Whole call** (the headline): ``explain(store, broden, "layer4", units, length=3, beam=5)``
   timed from the store on disk to the result, with an empty annotation cache (the call
   decodes Broden's label PNGs and writes the cache: *cold*), then once more with the cache
   written (*warm*; ``--no-warm`` skips it). The result's ``meta["seconds"]`` splits each call
   into the counting (thresholds and the one pass over annotations and activations) and the
   beam search. Full: 512 units on 2,000 images, target under 10 minutes on 2 CPU cores;
   ``--quick``: the first 64 units on 500 images. For scale, ``dissect()`` of the same layer
   (all 512 units, warm cache) is timed too.
2. **Naive dense reference** on the first ``--naive-units`` units (default 2): the same beam
   search (Mu & Andreas': every formula of the beam extended by every concept and operator at
   every step, memoized) with every candidate's IoU computed from dense boolean masks over all
   ``N x 112 x 112`` pixels (concept masks built once from the label planes; the unit's active
   mask ``F.interpolate(...) > T`` once), as their research code scores candidates. Its
   formulas and IoUs must equal ``explain()``'s (the script raises otherwise); its time per
   unit, times the units of the headline, over ``explain()``'s warm time is the speedup
   printed (an extrapolation: the naive search is not run on all units).

Peak memory: ``ru_maxrss`` of this process (it includes the capture and the naive reference).
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_text, maxrss_mib  # noqa: E402
from bench_netdissect import make_model, open_broden  # noqa: E402  (the same model and reader)

from dissect.datasets import Broden, SyntheticConcepts, write_broden  # noqa: E402
from dissect.hooks import capture  # noqa: E402
from dissect.netdissect import dissect, explain  # noqa: E402
from dissect.netdissect.explain import concept_names, formula_text  # noqa: E402
from dissect.netdissect.explain_search import OPERATORS  # noqa: E402
from dissect.store import ActivationStore  # noqa: E402

LAYER = "layer4"
LENGTH = 3
BEAM = 5
QUANTILE = 0.005
TARGET_S = 600.0


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


class NaiveDense:
    """Mu & Andreas' beam search with dense masks over every pixel of the dataset."""

    def __init__(self, broden: Broden, store: ActivationStore, thresholds: np.ndarray) -> None:
        self.concepts = [c for c in broden.concepts if c.number != 0]
        self.names = concept_names(self.concepts)
        cats = list(broden.categories)
        index = store.index
        items = [broden.annotations(int(i)) for i in index]
        self.sh, self.sw = items[0]["pixel_labels"].shape[-2:]
        self.annotated = np.stack([it["annotated"].numpy() for it in items])
        self.cat = np.array([cats.index(c.category) for c in self.concepts])
        self.masks = []  # (N, sh, sw) bool per concept, where its category is annotated
        for j, c in enumerate(self.concepts):
            m = np.stack([(it["pixel_labels"].numpy() == c.number).any(0)
                          | (c.number in it["image_labels"].tolist()) for it in items])
            m &= self.annotated[:, self.cat[j], None, None]
            self.masks.append(m)
        self.store, self.thresholds = store, thresholds

    def active(self, unit: int) -> np.ndarray:
        ds = self.store[LAYER]
        out = []
        for s in range(0, len(self.store), 256):
            maps = torch.from_numpy(np.asarray(ds[s : s + 256, unit : unit + 1], np.float32))
            up = F.interpolate(maps, size=(self.sh, self.sw), mode="bilinear",
                               align_corners=False)
            t = float(self.thresholds[unit])
            out.append(((up > t) & torch.isfinite(up))[:, 0].numpy())
        return np.concatenate(out)

    def iou(self, active: np.ndarray, key: tuple[int, ...]) -> float:
        cols = key[0::2]
        m = self.masks[cols[0]].copy()
        for op, c in zip(key[1::2], cols[1:], strict=True):
            if op == 0:
                m &= self.masks[c]
            elif op == 1:
                m |= self.masks[c]
            else:
                m &= ~self.masks[c]
        domain = self.annotated[:, sorted({int(self.cat[c]) for c in cols})].all(1)
        m, a = m[domain], active[domain]
        inter, union = int((a & m).sum()), int((a | m).sum())
        return inter / union if union else 0.0

    def search(self, unit: int) -> tuple[str, float, int]:
        active = self.active(unit)
        scored: dict[tuple[int, ...], float] = {}

        def score(key: tuple[int, ...]) -> float:
            if key not in scored:
                scored[key] = self.iou(active, key)
            return scored[key]

        def order(key: tuple[int, ...]) -> tuple:
            return (-scored[key], len(key), key)

        C = len(self.concepts)
        beam = sorted(((c,) for c in range(C)), key=lambda k: (-score(k), 1, k))[:BEAM]
        for _ in range(LENGTH - 1):
            pool = set(beam)
            for key in beam:
                for op in range(len(OPERATORS)):
                    for c in range(C):
                        if c not in key[0::2]:
                            score(key + (op, c))
                            pool.add(key + (op, c))
            beam = sorted(pool, key=order)[:BEAM]
        return formula_text(beam[0], self.names), scored[beam[0]], len(scored)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the first 64 units on 500 images (about 2 minutes)")
    parser.add_argument("--n", type=int, help="images (default 2000, 500 with --quick)")
    parser.add_argument("--units", type=int, help="first units explained (default 512, 64 "
                                                  "with --quick)")
    parser.add_argument("--naive-units", type=int, default=2,
                        help="units the naive dense reference searches (0: skip it)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache call")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (500 if args.quick else 2000)
    k = args.units or (64 if args.quick else 512)
    mode = "quick" if args.quick else "full"
    print(f"bench_explain ({mode}: first {k} units of ResNet-18 {LAYER} on {n} images; "
          f"length {LENGTH}, beam {BEAM}, quantile {QUANTILE})")
    print(machine_text(torch.device("cpu"), f"numpy {np.__version__}"))

    with tempfile.TemporaryDirectory(prefix="bench_explain_") as tmp:
        cache_dir = Path(tmp) / "dissect-cache"  # never ~/.cache
        os.environ["DISSECT_CACHE_DIR"] = str(cache_dir)
        root = Path(tmp) / "broden"
        write_s, _ = timed(lambda: write_broden(SyntheticConcepts(n, size=224, seed=0), root,
                                                image_format="jpg"))
        broden = open_broden(root)
        capture_s, store = timed(lambda: capture(make_model(), broden, [LAYER],
                                                 Path(tmp) / "layer4.h5", dtype="float32",
                                                 progress=False))
        units_all, h, w = store[LAYER].shape[1:]
        units = list(range(min(k, units_all)))
        print(f"data: {n} Broden-format images (224 px, 112x112 labels, "
              f"{len(broden.concepts)} concepts in {len(broden.categories)} categories); "
              f"{LAYER}: {units_all} units of {h}x{w}; write_broden {write_s:.1f} s, "
              f"capture {capture_s:.1f} s (setup, not timed below)")

        print("\n1. explain() whole call (store on disk -> result)")
        calls = [("cold", True)] + ([] if args.no_warm else [("warm", False)])
        results = {}
        for name, _cold in calls:
            seconds, res = timed(lambda: explain(store, broden, LAYER, units, length=LENGTH,
                                                 beam=BEAM, quantile=QUANTILE,
                                                 progress=False))
            results[name] = (seconds, res)
            sec = res.meta["seconds"]
            print(f"  {name:<4} cache: {seconds:7.1f} s  (counting {sec['count']:.1f} s, "
                  f"search {sec['search']:.1f} s; {res.meta['n_entries']} entries)")
        best = min(s for s, _ in results.values())
        res = results[calls[-1][0]][1]
        if not args.quick:
            verdict = "MET" if best < TARGET_S else "MISSED"
            print(f"  target: {len(units)} units on {n} images under {TARGET_S / 60:.0f} min: "
                  f"{best:.1f} s = {best / 60:.2f} min -> {verdict}")
        d_s, _ = timed(lambda: dissect(store, broden, [LAYER], quantile=QUANTILE,
                                       progress=False))
        print(f"  for scale: dissect() of {LAYER} (all {units_all} units, warm cache) "
              f"{d_s:.1f} s")
        lengths = np.bincount([e.length for e in res], minlength=LENGTH + 1)[1:]
        better = sum(e.iou > e.best_iou for e in res)
        gain = np.mean([e.iou / e.best_iou for e in res if e.best_iou > 0])
        print(f"  formulas by length 1/2/3: {'/'.join(str(int(x)) for x in lengths)}; "
              f"{better} of {len(res)} units improve on their best single concept "
              f"(mean IoU ratio {gain:.2f}x)")
        for e in sorted(res, key=lambda e: -e.iou)[:3]:
            print(f"    unit {e.unit:>3}: {e.formula:<40} IoU {e.iou:.4f} "
                  f"(best single {e.best_concept} {e.best_iou:.4f})")

        if args.naive_units:
            print(f"\n2. naive dense-mask reference on units 0..{args.naive_units - 1}")
            thresholds = np.array([e.threshold for e in res])
            build_s, naive = timed(lambda: NaiveDense(broden, store, thresholds))
            print(f"  dense concept masks: {build_s:.1f} s (built once, not counted below)")
            per_unit = []
            for u in range(min(args.naive_units, len(units))):
                seconds, (formula, iou, n_scored) = timed(lambda u=u: naive.search(u))
                per_unit.append(seconds)
                ours = res[u]
                same = formula == ours.formula and iou == ours.iou
                print(f"  unit {u}: {seconds:6.1f} s for {n_scored} candidates, {formula} "
                      f"IoU {iou:.4f}; explain(): {'identical' if same else 'DIFFERENT'}")
                if not same:
                    raise AssertionError(f"unit {u}: naive {formula} {iou!r}, explain() "
                                         f"{ours.formula} {ours.iou!r}")
            warm = results[calls[-1][0]][0]
            naive_all = np.mean(per_unit) * len(units)
            print(f"  naive extrapolated to {len(units)} units: {naive_all:.0f} s "
                  f"= {naive_all / 60:.1f} min; explain() {warm:.1f} s -> "
                  f"{naive_all / warm:.0f}x faster")
        print(f"\npeak RSS (ru_maxrss, whole process): {maxrss_mib():.0f} MiB")
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
