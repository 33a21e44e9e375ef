"""SyntheticConcepts: deterministic, pixel-exact concept masks, known composition."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from dissect import DataError
from dissect.datasets import PALETTE, ConceptDataset, SyntheticConcepts


@pytest.fixture(scope="module")
def ds() -> SyntheticConcepts:
    return SyntheticConcepts(48, size=64, seed=7)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a
    )


def test_contract(ds: SyntheticConcepts) -> None:
    assert isinstance(ds, ConceptDataset)
    assert ds.categories == ["color", "object", "part", "scene", "texture"]
    assert len(ds.concepts) >= 25
    assert [c.number for c in ds.concepts] == list(range(1, len(ds.concepts) + 1))
    names = {c.category: set() for c in ds.concepts}
    for c in ds.concepts:
        names[c.category].add(c.name)
    assert {"red", "green", "blue", "yellow", "black", "white"} <= names["color"]
    assert {"circle", "square", "triangle", "star"} <= names["object"]
    assert {"interior", "border", "corner"} <= names["part"]
    assert {"striped", "dotted", "checkered", "zigzagged"} <= names["texture"]
    assert len(names["scene"]) >= 2
    item = ds[3]
    assert set(item) == {"image", "pixel_labels", "image_labels", "annotated", "index"}
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert item["pixel_labels"].dtype == torch.int64 and item["pixel_labels"].shape[1:] == (32, 32)
    assert item["image_labels"].dtype == torch.int64 and item["image_labels"].ndim == 1
    assert item["annotated"].dtype == torch.bool and item["annotated"].shape == (5,)
    assert item["index"] == 3 and ds[-1]["index"] == 47
    with pytest.raises(IndexError):
        ds[48]


def test_deterministic_and_order_independent(ds: SyntheticConcepts) -> None:
    fresh = SyntheticConcepts(100, size=64, seed=7)  # other length, reverse access order
    for i in (40, 11, 5, 0):
        assert _same(fresh[i], ds[i])
    assert _same(pickle.loads(pickle.dumps(ds))[9], ds[9])
    other = SyntheticConcepts(48, size=64, seed=8)
    assert not all(torch.equal(other[i]["image"], ds[i]["image"]) for i in range(5))


def test_colors_exact(ds: SyntheticConcepts) -> None:
    """Each segmentation pixel is a 2x2 image block of exactly its color label's RGB."""
    rgb = torch.zeros(len(ds.concepts) + 1, 3)
    for c in ds.concepts:
        if c.category == "color":
            rgb[c.number] = torch.tensor(PALETTE[c.name], dtype=torch.float32) / 255
    for i in range(len(ds)):
        item = ds[i]
        color = item["pixel_labels"][0]
        assert bool((color > 0).all())  # every pixel has a color
        expected = rgb[color].permute(2, 0, 1)
        assert torch.equal(F.interpolate(expected[None], scale_factor=2)[0], item["image"])


def test_shapes_and_parts_consistent(ds: SyntheticConcepts) -> None:
    number = {(c.category, c.name): c.number for c in ds.concepts}
    shape_colors = {number["color", c] for c in ("red", "green", "blue", "yellow", "orange",
                                                  "purple")}
    interior, border, corner = (number["part", p] for p in ("interior", "border", "corner"))
    b = 1  # border width at 32 px segmentations: max(1, 32 // 28)
    n_corners = 0
    for i in range(len(ds)):
        item = ds[i]
        planes = item["pixel_labels"]
        color, obj = planes[0], planes[1]
        shape = obj > 0
        assert torch.equal(shape, torch.isin(color, torch.tensor(sorted(shape_colors))))
        if not bool(item["annotated"][2]):
            assert planes.shape[0] == 2
            continue
        part, corners = planes[2], planes[3]
        assert torch.equal(part > 0, shape)
        assert set(part.unique().tolist()) <= {0, interior, border}
        assert set(corners.unique().tolist()) <= {0, corner}
        assert bool((corners[~shape] == 0).all())
        n_corners += int((corners > 0).sum())
        # interior pixels: the whole (2b+1)^2 neighbourhood has the same object label
        padded = F.pad(obj[None, None].float(), (b, b, b, b))[0, 0]
        win = padded.unfold(0, 2 * b + 1, 1).unfold(1, 2 * b + 1, 1)
        flat = win.reshape(*obj.shape, -1)
        homogeneous = (flat == obj[..., None]).all(-1)
        assert bool(homogeneous[part == interior].all())
        assert bool((part == interior).any())
    assert n_corners > 0


def test_image_labels_and_targets(ds: SyntheticConcepts) -> None:
    number = {(c.category, c.name): c.number for c in ds.concepts}
    targets = ds.targets
    assert targets.dtype == torch.int64 and targets.shape == (len(ds),)
    assert ds.target_names == ["circle", "square", "triangle", "star", "hexagon", "diamond"]
    for i in range(len(ds)):
        comp, item = ds.describe(i), ds[i]
        main = comp["shapes"][-1]
        assert ds.target_names[int(targets[i])] == main["kind"] == ds.target_names[comp["target"]]
        assert bool((item["pixel_labels"][1] == number["object", main["kind"]]).any())
        assert main["radius"] > max([s["radius"] for s in comp["shapes"][:-1]], default=0)
        expected = [number["scene", comp["scene"]]] * comp["annotated"]["scene"]
        expected += [number["texture", comp["texture"]]] * comp["annotated"]["texture"]
        assert item["image_labels"].tolist() == expected
        count = {1: "single", 2: "pair"}.get(len(comp["shapes"]), "group")
        assert comp["scene"].startswith(count)


def test_annotated_share() -> None:
    ds = SyntheticConcepts(300, size=32, seed=1, unannotated=0.3)
    flags = torch.stack([ds[i]["annotated"] for i in range(len(ds))]).float().mean(0)
    assert flags[0] == 1 and flags[1] == 1  # color and object: always
    assert all(0.55 < float(f) < 0.85 for f in flags[2:])
    full = SyntheticConcepts(20, size=32, seed=1, unannotated=0.0)
    assert all(bool(full[i]["annotated"].all()) for i in range(20))


def test_transform_and_arguments() -> None:
    ds = SyntheticConcepts(3, size=32)
    plain = ds[0]["image"]
    ds.transform = lambda x: x.flip(0)
    assert torch.equal(ds[0]["image"], plain.flip(0))
    for bad in ({"n": -1}, {"n": 2, "size": 33}, {"n": 2, "size": 14}, {"n": 2, "seed": -1},
                {"n": 2, "unannotated": 1.0}):
        with pytest.raises(DataError):
            SyntheticConcepts(**bad)


def test_textures_differ_per_kind() -> None:
    """The background holds two colors and its pattern matches the texture's kind."""
    ds = SyntheticConcepts(60, size=112, seed=2)
    seen = set()
    for i in range(len(ds)):
        comp = ds.describe(i)
        color = ds[i]["pixel_labels"][0]
        background = ds[i]["pixel_labels"][1] == 0
        assert len(color[background].unique()) <= 2
        seen.add(comp["texture"])
        if comp["texture"] == "striped":  # horizontal stripes: rows of one color
            rows = [set(color[y][background[y]].tolist()) for y in range(color.shape[0])]
            assert all(len(r) <= 1 for r in rows)
    assert seen == {"striped", "dotted", "checkered", "zigzagged", "grid"}
    assert len(ds.concepts) == 31
