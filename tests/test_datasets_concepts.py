"""The ConceptDataset contract: Concept rows, collate, DataLoader workers, data source names."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from test_datasets_broden import make_broden
from torch.utils.data import DataLoader

from dissect import DataError
from dissect.datasets import (
    Broden,
    Concept,
    ImageFolder,
    SampleImages,
    SyntheticConcepts,
    collate,
    open_dataset,
)


def test_concept_row() -> None:
    c = Concept(3, "red", "color")
    assert (c.number, c.name, c.category) == (3, "red", "color") == tuple(c)
    assert pickle.loads(pickle.dumps(c)) == c and hash(c) == hash(Concept(3, "red", "color"))
    with pytest.raises(AttributeError):
        c.name = "blue"


def _item(index: int, planes: int, labels: list[int], size: int = 4) -> dict:
    return {
        "image": torch.full((3, 2 * size, 2 * size), float(index)),
        "pixel_labels": torch.full((planes, size, size), index + 1, dtype=torch.int64),
        "image_labels": torch.tensor(labels, dtype=torch.int64),
        "annotated": torch.tensor([planes > 0, bool(labels)]),
        "index": index,
    }


def test_collate_pads_planes_and_labels() -> None:
    batch = collate([_item(0, 2, [5]), _item(1, 4, []), _item(2, 0, [7, 8])])
    assert batch["image"].shape == (3, 3, 8, 8)
    assert batch["pixel_labels"].shape == (3, 4, 4, 4)
    assert batch["pixel_labels"].dtype == torch.int64
    assert batch["pixel_labels"][0, :2].eq(1).all() and batch["pixel_labels"][0, 2:].eq(0).all()
    assert batch["pixel_labels"][1].eq(2).all() and batch["pixel_labels"][2].eq(0).all()
    assert batch["image_labels"].tolist() == [[5, 0], [0, 0], [7, 8]]
    assert batch["annotated"].tolist() == [[True, True], [True, False], [False, True]]
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.int64
    empty = collate([_item(0, 0, []), _item(1, 0, [])])
    assert empty["pixel_labels"].shape == (2, 0, 4, 4) and empty["image_labels"].shape == (2, 0)
    with pytest.raises(DataError, match="image"):
        collate([_item(0, 1, []), {**_item(1, 1, []), "image": torch.zeros(3, 4, 4)}])
    with pytest.raises(DataError, match="pixel_labels"):
        collate([_item(0, 1, []), {**_item(1, 1, []), "pixel_labels": torch.zeros(1, 3, 3)}])


def test_dataloader_with_workers(tmp_path: Path) -> None:
    ds = SyntheticConcepts(10, size=32, seed=2, unannotated=0.5)
    make_broden(tmp_path)
    broden = Broden(tmp_path, split="train")
    for data, batch_size in ((ds, 4), (broden, 2)):
        loader = DataLoader(data, batch_size=batch_size, num_workers=2, collate_fn=collate)
        batches = list(loader)
        assert sum(len(b["index"]) for b in batches) == len(data)
        for b, start in zip(batches, range(0, len(data), batch_size), strict=True):
            expected = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            for key in expected:
                assert torch.equal(b[key], expected[key]), key


def test_datasets_pickle(tmp_path: Path) -> None:
    make_broden(tmp_path)
    for ds in (SyntheticConcepts(4, size=32), Broden(tmp_path)):
        clone = pickle.loads(pickle.dumps(ds))
        assert clone.concepts == ds.concepts and clone.categories == ds.categories
        assert torch.equal(clone[1]["pixel_labels"], ds[1]["pixel_labels"])


def test_open_dataset(tmp_path: Path) -> None:
    assert len(open_dataset("synthetic:7")) == 7
    assert isinstance(open_dataset("synthetic"), SyntheticConcepts)
    make_broden(tmp_path / "broden")
    assert isinstance(open_dataset(f"broden:{tmp_path / 'broden'}"), Broden)
    assert len(open_dataset(str(tmp_path / "broden"))) == 3
    assert isinstance(open_dataset(str(tmp_path / "broden" / "images")), ImageFolder)
    flip = open_dataset("synthetic:2", transform=lambda x: x.flip(0))
    assert torch.equal(flip[0]["image"], SyntheticConcepts(2)[0]["image"].flip(0))
    with pytest.raises(DataError, match="synthetic:N"):
        open_dataset("synthetic:many")
    with pytest.raises(DataError):
        open_dataset(str(tmp_path / "nothing-here"))


def test_sample_images() -> None:
    ds = open_dataset("samples")  # the bundled photographs
    assert isinstance(ds, SampleImages)
    assert "chelsea" in ds.names and len(ds) >= 1
    item = ds[ds.names.index("chelsea")]
    assert item["image"].shape == (3, 300, 451) and item["image"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1
