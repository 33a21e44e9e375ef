"""Concept-data throughput: Broden-format reading (0 and 2 workers) and synthetic generation.

Run standalone: ``.venv/bin/python benchmarks/bench_datasets.py [--quick]``. Prints a table;
never asserts timings. The Broden-format data are written here with ``write_broden`` from
``SyntheticConcepts`` (JPEG images and RG-encoded label PNGs, like the published broden1_224:
224 px images, 112 px segmentations, 4 label planes and up to 2 image-level labels each).
The "PIL loop" row decodes the same files the way the original NetDissect loader does (PIL
imread, ``R + 256 * G`` in numpy, one process) for comparison.

The annotation-cache rows time what a dissection's counting pass reads: the label planes,
image-level labels and flags of every item, in batches of 64, one process. "decode" is
``annotation_batches(..., cache=False)`` (``Broden.annotations``: the label PNGs decoded each
time, as every run did before the cache, and as NetDissect-Lite does); "cache" is the same call
reading the cache written by a first pass (timed too). Medians of 5 alternating repeats; the
ratio is decode over cache (target >= 5x).

The segmentation-folder rows write the same Broden data as a ``SegmentationFolder`` (the same
JPEG files, one mask PNG per pixel-level category, 8-bit here, see :func:`write_folder`; the folder
holds fewer planes than the Broden, as its two part planes merge into one) and time, one process,
``annotations(i)`` of every item (``annotation_batches(..., cache=False)``, as above), full items
``ds[i]`` (the image decoded too) and ``check_dataset`` (what ``dissect data check`` waits for),
each against the same on the Broden. Medians of alternating repeats (after one warm-up each);
"(0.80x Broden)" is the folder's time over the Broden's (above 1: the folder is slower).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dissect.datasets import Broden, SyntheticConcepts, collate, write_broden  # noqa: E402
from dissect.datasets.check import check_dataset  # noqa: E402
from dissect.datasets.segmentation_folder import SegmentationFolder  # noqa: E402


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench_synthetic(n: int, size: int) -> dict:
    ds = SyntheticConcepts(n, size=size, seed=0)
    ds[0]  # warm up
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    seconds = time.perf_counter() - start
    return {
        "what": f"SyntheticConcepts {size}px, 1 core",
        "items": n,
        "seconds": seconds,
        "items_per_s": _rate(n, seconds),
    }


def bench_broden(root: Path, workers: int, batch_size: int) -> dict:
    ds = Broden(root)
    planes = sum(len(ds.item_categories(i)[0]) for i in range(len(ds)))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    start = time.perf_counter()
    count = sum(len(batch["index"]) for batch in loader)
    seconds = time.perf_counter() - start
    return {
        "what": f"Broden reader, DataLoader num_workers={workers}",
        "items": count,
        "seconds": seconds,
        "items_per_s": _rate(count, seconds),
        "masks_per_s": _rate(planes, seconds),
    }


def bench_pil_loop(root: Path) -> dict:
    """NetDissect-style decoding of the same files with PIL, for comparison."""
    from PIL import Image

    ds = Broden(root)
    rows = [(ds.filename(i), ds.label_files(i)) for i in range(len(ds))]
    start = time.perf_counter()
    planes = 0
    for image, masks in rows:
        np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
        for mask in masks:
            rgb = np.asarray(Image.open(mask))
            _ = rgb[:, :, 0].astype(np.int64) + rgb[:, :, 1].astype(np.int64) * 256
            planes += 1
    seconds = time.perf_counter() - start
    return {
        "what": "PIL loop (NetDissect-style), 1 process",
        "items": len(rows),
        "seconds": seconds,
        "items_per_s": _rate(len(rows), seconds),
        "masks_per_s": _rate(planes, seconds),
    }


def bench_annotation_cache(root: Path, cache: Path, repeats: int) -> list[dict]:
    """Annotations from the cache vs decoded from the PNGs (see the module docstring)."""
    from dissect.datasets.annotation_cache import annotation_batches

    ds = Broden(root)
    items = np.arange(len(ds))

    def run(where) -> float:
        start = time.perf_counter()
        with annotation_batches(ds, items, 64, cache=where) as batches:
            for _ in batches:
                pass
        return time.perf_counter() - start

    first = run(cache)
    decode, cached = [], []
    for _ in range(repeats):
        decode.append(run(False))
        cached.append(run(cache))
    d, c = statistics.median(decode), statistics.median(cached)
    return [
        {"what": "annotations: decode label PNGs (no cache)", "items": len(ds), "seconds": d,
         "items_per_s": _rate(len(ds), d)},
        {"what": "annotations: first pass, writing the cache", "items": len(ds),
         "seconds": first, "items_per_s": _rate(len(ds), first)},
        {"what": f"annotations: from the cache ({d / c:.1f}x decode)", "items": len(ds),
         "seconds": c, "items_per_s": _rate(len(ds), c)},
    ]


def write_folder(broden: Path, out: Path) -> int:
    """Write the Broden at ``broden`` as a segmentation folder at ``out``; return its planes.

    ``labels.csv`` is the Broden's concept table (rows in category order, then by number);
    ``images/<id>.jpg`` are copies of its JPEG files (the same bytes, so both decode the same
    images); ``masks/<id>.<category>.png`` hold one plane per pixel-level category per item,
    8-bit when every label number is below 256, else 16-bit; ``image_labels.csv`` the
    image-level labels. A SegmentationFolder has ONE plane per category, so a category with
    several Broden planes (SyntheticConcepts' two ``part`` planes) is merged into one, later
    planes over earlier ones where they are non-zero: the folder then holds fewer planes than
    the Broden (and loses the overlap of the merged planes).
    """
    ds = Broden(broden)
    order = {c: k for k, c in enumerate(ds.categories)}
    concepts = sorted(ds.concepts, key=lambda c: (order[c.category], c.number))
    dtype = np.uint8 if max(c.number for c in concepts) < 256 else np.uint16
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    with open(out / "labels.csv", "w", encoding="utf-8") as f:
        f.write("number,name,category\n")
        f.writelines(f"{c.number},{c.name},{c.category}\n" for c in concepts)
    planes, image_rows = 0, []
    for i in range(len(ds)):
        ident = f"{i:06d}"
        shutil.copyfile(ds.filename(i), out / "images" / f"{ident}{ds.filename(i).suffix}")
        item = ds.annotations(i)
        pixel_cats = ds.item_categories(i)[0]
        merged: dict[str, np.ndarray] = {}
        for cat, plane in zip(pixel_cats, item["pixel_labels"].numpy(), strict=True):
            if cat in merged:
                merged[cat] = np.where(plane != 0, plane, merged[cat])
            else:
                merged[cat] = plane
        for cat, plane in merged.items():
            if not cv2.imwrite(str(out / "masks" / f"{ident}.{cat}.png"), plane.astype(dtype)):
                raise OSError(f"could not write the {cat} mask of item {i}")
        planes += len(merged)
        image_rows += [(ident, int(n)) for n in item["image_labels"].tolist()]
    with open(out / "image_labels.csv", "w", encoding="utf-8") as f:
        f.write("image,number\n")
        f.writelines(f"{ident},{n}\n" for ident, n in image_rows)
    return planes


def bench_folder(broden: Path, folder: Path, repeats: int) -> list[dict]:
    """SegmentationFolder vs Broden: annotations, full items, check_dataset (module docstring)."""
    from dissect.datasets.annotation_cache import annotation_batches

    sets = {"folder": SegmentationFolder(folder), "broden": Broden(broden)}
    n = len(sets["broden"])
    assert len(sets["folder"]) == n
    planes = {k: sum(len(ds.item_categories(i)[0]) for i in range(n)) for k, ds in sets.items()}
    roots = {"folder": folder, "broden": broden}

    def annotations(key: str) -> float:
        start = time.perf_counter()
        with annotation_batches(sets[key], np.arange(n), 64, cache=False) as batches:
            for _ in batches:
                pass
        return time.perf_counter() - start

    def items(key: str) -> float:
        ds = sets[key]
        start = time.perf_counter()
        for i in range(n):
            ds[i]
        return time.perf_counter() - start

    def check(key: str) -> float:
        start = time.perf_counter()
        check_dataset(roots[key], progress=False)
        return time.perf_counter() - start

    rows = []
    for what, run, reps in (("annotations", annotations, repeats), ("items ds[i]", items, repeats),
                            ("check_dataset", check, max(1, repeats // 2))):
        times: dict[str, list[float]] = {"folder": [], "broden": []}
        for key in times:  # warm-up (file cache, imports)
            run(key)
        for _ in range(reps):
            for key in times:
                times[key].append(run(key))
        f, b = statistics.median(times["folder"]), statistics.median(times["broden"])
        rows.append({"what": f"SegmentationFolder {what} ({f / b:.2f}x Broden)", "items": n,
                     "seconds": f, "items_per_s": _rate(n, f),
                     "masks_per_s": _rate(planes["folder"], f)})
        rows.append({"what": f"Broden {what}", "items": n, "seconds": b,
                     "items_per_s": _rate(n, b), "masks_per_s": _rate(planes["broden"], b)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--n", type=int, help="images in the Broden-format data")
    parser.add_argument("--synthetic-n", type=int, help="synthetic images to generate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n = args.n or (64 if args.quick else 1000)
    synthetic_n = args.synthetic_n or (300 if args.quick else 3000)
    torch.set_num_threads(1)  # "one core" for the generation figure; workers use 1 each anyway

    results = [bench_synthetic(synthetic_n, 112), bench_synthetic(max(1, synthetic_n // 4), 224)]
    with tempfile.TemporaryDirectory(prefix="bench_broden_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_broden(SyntheticConcepts(n, size=224, seed=1), root, image_format="jpg")
        write_seconds = time.perf_counter() - start
        results.append(
            {
                "what": "write_broden 224px (jpg + PNG masks)",
                "items": n,
                "seconds": write_seconds,
                "items_per_s": _rate(n, write_seconds),
            }
        )
        for workers in (0, 2):
            results.append(bench_broden(root, workers, batch_size=32))
        results.append(bench_pil_loop(root))
        results.extend(bench_annotation_cache(root, root / "cache", 3 if args.quick else 5))
        start = time.perf_counter()
        folder_planes = write_folder(root, Path(tmp) / "folder")
        write_seconds = time.perf_counter() - start
        results.append({"what": f"write_folder (from the Broden, {folder_planes} masks)",
                        "items": n, "seconds": write_seconds,
                        "items_per_s": _rate(n, write_seconds),
                        "masks_per_s": _rate(folder_planes, write_seconds)})
        results.extend(bench_folder(root, Path(tmp) / "folder", 3 if args.quick else 5))

    print(
        f"bench_datasets ({'quick' if args.quick else 'full'}; {os.cpu_count()} CPUs, "
        f"torch {torch.__version__})"
    )
    print(f"{'what':<50} {'items':>6} {'seconds':>8} {'items/s':>9} {'masks/s':>9}")
    for r in results:
        masks = f"{r['masks_per_s']:9.0f}" if "masks_per_s" in r else f"{'-':>9}"
        print(
            f"{r['what']:<50} {r['items']:>6} {r['seconds']:>8.2f} {r['items_per_s']:>9.0f} {masks}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
