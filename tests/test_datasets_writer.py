"""write_broden: any concept dataset -> Broden files -> Broden reader, exactly."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_datasets_broden import make_broden

from dissect import DataError
from dissect.datasets import Broden, SyntheticConcepts, write_broden


def assert_same_items(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            u, v = torch.as_tensor(x[key]), torch.as_tensor(y[key])
            assert u.dtype == v.dtype and u.shape == v.shape, (i, key)
            assert torch.equal(u, v), (i, key)


def test_synthetic_round_trip_is_exact(tmp_path: Path) -> None:
    ds = SyntheticConcepts(24, size=48, seed=5, unannotated=0.3)
    ds.transform = lambda x: x * 2 - 1  # ignored by the writer
    root = write_broden(ds, tmp_path / "b", split="val")
    assert root == tmp_path / "b"
    back = Broden(root)
    assert back.categories == ds.categories
    assert back.concepts == ds.concepts
    assert back.splits == ["val"] * 24
    ds.transform = None
    assert_same_items(ds, back)
    for i in (0, 5):
        assert back.item_categories(i) == ds.item_categories(i)
    assert (root / "images/syntheticconcepts/000000.png").is_file()
    with open(root / "index.csv") as f:
        header = next(csv.reader(f))
    assert header == ["image", "split", "ih", "iw", "sh", "sw", *ds.categories]
    with open(root / "label.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [c.name for c in ds.concepts]
    assert all(r["category"].startswith(c.category + "(") for r, c in zip(rows, ds.concepts,
                                                                          strict=True))


def test_broden_round_trip_keeps_planes_and_large_labels(tmp_path: Path, caplog) -> None:
    make_broden(tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        src = Broden(tmp_path / "src")
        back = Broden(write_broden(src, tmp_path / "out"))
    assert back.splits == src.splits
    assert [(c.number, c.name) for c in back.concepts] == [(c.number, c.name)
                                                            for c in src.concepts]
    assert_same_items(src, back)  # PNG images: lossless; JPEG source re-encoded as PNG exactly
    assert back.item_categories(0) == src.item_categories(0)
    assert back.labels[5].syns == ("cloth", "textile")


class Anonymous:
    """A ConceptDataset without item_categories: the writer infers plane categories."""

    def __init__(self, inner: SyntheticConcepts) -> None:
        self.inner = inner
        self.categories, self.concepts, self.transform = inner.categories, inner.concepts, None

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        return self.inner[i]


def test_writer_infers_categories_without_item_categories(tmp_path: Path) -> None:
    ds = SyntheticConcepts(10, size=32, seed=3)
    back = Broden(write_broden(Anonymous(ds), tmp_path))
    assert back.concepts == ds.concepts
    assert_same_items(ds, back)


def test_jpeg_when_asked(tmp_path: Path) -> None:
    ds = SyntheticConcepts(6, size=64, seed=4)
    back = Broden(write_broden(ds, tmp_path, image_format="jpg"))
    assert back.filename(0).suffix == ".jpg"
    for i in range(len(ds)):
        a, b = ds[i], back[i]
        assert torch.equal(a["pixel_labels"], b["pixel_labels"])  # masks stay lossless
        assert torch.equal(a["image_labels"], b["image_labels"])
        assert float((a["image"] - b["image"]).abs().mean()) < 0.05


def test_writer_errors(tmp_path: Path) -> None:
    ds = SyntheticConcepts(2, size=32)
    with pytest.raises(DataError, match="image_format"):
        write_broden(ds, tmp_path, image_format="gif")
    write_broden(ds, tmp_path)
    with pytest.raises(DataError, match="overwrite=True"):
        write_broden(ds, tmp_path)
    write_broden(ds, tmp_path, overwrite=True)

    class Unknown(Anonymous):
        def __getitem__(self, i: int) -> dict:
            item = dict(self.inner[i])
            item["image_labels"] = torch.tensor([999])
            return item

    with pytest.raises(DataError, match=r"item 0: .*\[999\]"):
        write_broden(Unknown(ds), tmp_path / "bad")
    assert not (tmp_path / "bad" / "index.csv").exists()
    assert not (tmp_path / "bad" / "index.csv.partial").exists()


def test_zero_occurrence_concepts_are_kept(tmp_path: Path) -> None:
    ds = SyntheticConcepts(1, size=32, seed=0)
    back = Broden(write_broden(ds, tmp_path))
    assert back.concepts == ds.concepts  # most concepts never occur in one image
    with open(tmp_path / "c_object.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["code"]) for r in rows) == list(range(1, len(rows) + 1))
    assert np.isclose(sum(float(r["coverage"]) for r in rows),
                      float((ds[0]["pixel_labels"][1] > 0).float().mean()))
