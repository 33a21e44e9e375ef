"""Check `compare_results` against the NetDissect authors' own published counts.

The CSAILVision/NetDissect repository ships, in ``plot/``, the per-unit result CSVs of five
networks (``caffe_reference_*.csv``, ``ResNet-152-model_*.csv``) and the counts its MATLAB
script ``extract_csv.m`` computed from them (``semantics_cvpr_release.mat``,
``semantics_samples.mat``: detectors and unique detectors per category). This script reads
each CSV with :meth:`DissectionResult.from_netdissect_csv`, counts with
:func:`compare_results`, and prints ours next to theirs::

    git clone https://github.com/CSAILVision/NetDissect
    python scripts/compare_published.py NetDissect/plot

Their "all" column of unique detectors in ``semantics_samples.mat`` is the sum of the detector
counts (a slip in ``extract_csv.m``: ``num_uniquedetector_overall = sum(num_detector_concepts)``);
``semantics_cvpr_release.mat`` has the sum of the unique counts, which is what ours is, so the
script compares the per-category columns and their sum. Needs scipy (a core dependency) to
read the ``.mat`` files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from scipy.io import loadmat

from dissect.netdissect import DissectionResult, compare_results

MAT_FILES = ("semantics_cvpr_release.mat", "semantics_samples.mat")


def published_counts(plot: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """``{network: (detectors, unique detectors, column names)}`` from the ``.mat`` files."""
    out = {}
    for name in MAT_FILES:
        if not (plot / name).is_file():
            continue
        stat = loadmat(str(plot / name), squeeze_me=True, struct_as_record=False)["stat"]
        concepts = [str(c) for c in stat.concepts]
        for row, network in enumerate(np.atleast_1d(stat.networks_name)):
            out.setdefault(str(network), (np.atleast_2d(stat.num_detectors)[row],
                                          np.atleast_2d(stat.num_uniquedetectors)[row],
                                          concepts))
    return out


def ours(csv: Path) -> tuple[int, dict[str, int], int]:
    """Detectors, unique detectors per category (NetDissect's rule) and their sum."""
    result = DissectionResult.from_netdissect_csv(csv)
    layer = result.layers[0]
    per_category = {
        cat: len({u.concept for u in result.units(layer, cat) if u.iou > result.iou_threshold})
        for cat in result.categories}
    row = compare_results(result, result).rows[0]
    assert row.unique_per_category_a == sum(per_category.values())
    return row.detectors_a, per_category, row.unique_per_category_a


def main(argv: list[str] | None = None) -> int:
    """Print ours next to the published counts; exit 1 when any differs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plot", type=Path, help="the plot/ folder of a NetDissect checkout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    published = published_counts(args.plot)
    csvs = sorted(p for p in args.plot.glob("*.csv") if p.stem in published)
    if not csvs:
        sys.stderr.write(f"no CSV in {args.plot} has counts in {MAT_FILES}\n")
        return 1
    differ = 0
    for csv in csvs:
        detectors, unique, concepts = published[csv.stem]
        our_detectors, our_unique, our_sum = ours(csv)
        cats = concepts[1:]  # column 0 is "all"
        theirs = dict(zip(cats, (int(v) for v in unique[1:]), strict=True))
        same = (our_detectors == int(detectors[0]) and sum(theirs.values()) == our_sum
                and all(our_unique.get(c, 0) == theirs[c] for c in cats))
        differ += not same
        sys.stdout.write(
            f"{csv.stem:<28} detectors {our_detectors:>5} / {int(detectors[0]):<5} "
            f"unique (per category, summed) {our_sum:>4} / {sum(theirs.values()):<4} "
            + " ".join(f"{c} {our_unique.get(c, 0)}/{theirs[c]}" for c in cats)
            + f"  {'same' if same else 'DIFFERENT'}\n")
    sys.stdout.write("ours / theirs (NetDissect's extract_csv.m)\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
