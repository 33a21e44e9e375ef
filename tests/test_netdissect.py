"""Network Dissection: exact counts against a naive loop, planted units get their concepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dissect import DissectError
from dissect.datasets import Concept, SyntheticConcepts
from dissect.datasets.synthetic import PALETTE, SHAPE_COLORS
from dissect.hooks import capture
from dissect.netdissect import DissectionResult, dissect
from dissect.store import ActivationStore, StoreWriter, create_store


class TinyConcepts:
    """A hand-made concept dataset with random labels; some categories unannotated."""

    categories = ["color", "part", "scene"]
    concepts = [Concept(1, "red", "color"), Concept(2, "blue", "color"),
                Concept(3, "edge", "part"), Concept(4, "rim", "part"),
                Concept(5, "beach", "scene"), Concept(7, "forest", "scene")]

    def __init__(self, n: int, seg: tuple[int, int], seed: int = 0, *,
                 annotated: tuple[float, ...] = (1.0, 0.5, 0.6),
                 color: tuple[float, ...] = (0.5, 0.3, 0.2),
                 part: tuple[float, ...] = (0.6, 0.2, 0.2)) -> None:
        """``annotated``: the chance each category is annotated on an image; ``color``,
        ``part``: the chances of no label and of each of the category's two concepts."""
        rng = np.random.default_rng(seed)
        self.n = n
        self.annotated = rng.random((n, 3)) < list(annotated)
        self.pixel = np.zeros((n, 3, *seg), dtype=np.int64)
        self.pixel[:, 0] = rng.choice([0, 1, 2], size=(n, *seg), p=list(color))
        part = rng.choice([0, 3, 4], size=(n, 2, *seg), p=list(part))
        self.pixel[:, 1:] = part * self.annotated[:, 1, None, None, None]
        scene = self.annotated[:, 2]
        self.image = [np.array([rng.choice([5, 7])] if a else [], dtype=np.int64) for a in scene]
        self.transform = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.zeros(3, 4, 4),
            "pixel_labels": torch.from_numpy(self.pixel[i]),
            "image_labels": torch.from_numpy(self.image[i]),
            "annotated": torch.from_numpy(self.annotated[i]),
            "index": i,
        }


def _store(path, acts: np.ndarray, dtype: str = "float32") -> ActivationStore:
    n = len(acts)
    create_store(path, n=n, layers={"conv": acts.shape[1:]}, dtype=dtype, pool=None, attrs={})
    with StoreWriter(path) as w:
        a = acts.astype(dtype)
        w.write(0, np.arange(n), {"conv": a},
                {"conv": a.astype(np.float32).max(axis=(2, 3))})
        w.finish()
    return ActivationStore(path)


def _naive_iou(acts: np.ndarray, ds: TinyConcepts, q: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference: per image, per unit, per concept loops over dense masks."""
    n, K = acts.shape[:2]
    seg = ds.pixel.shape[-2:]
    thr = np.quantile(acts.transpose(1, 0, 2, 3).reshape(K, -1), 1 - q, axis=1)
    cats = ds.categories
    C = len(ds.concepts)
    inter = np.zeros((K, C), dtype=np.int64)
    act_area = np.zeros((K, len(cats)), dtype=np.int64)
    area = np.zeros(C, dtype=np.int64)
    for i in range(n):
        item = ds[i]
        up = F.interpolate(torch.from_numpy(acts[i : i + 1]).float(), size=seg,
                           mode="bilinear", align_corners=False)[0].numpy()
        for j, c in enumerate(ds.concepts):
            if c.number in item["image_labels"].tolist():
                mask = np.ones(seg, dtype=bool)
            else:
                mask = (item["pixel_labels"].numpy() == c.number).any(axis=0)
            area[j] += mask.sum()
            for k in range(K):
                inter[k, j] += (mask & (up[k] > np.float32(thr[k]))).sum()
        for k in range(K):
            active = (up[k] > np.float32(thr[k])).sum()
            for g in range(len(cats)):
                if item["annotated"][g]:
                    act_area[k, g] += active
    cat_of = [cats.index(c.category) for c in ds.concepts]
    union = act_area[:, cat_of] + area[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0), thr


@pytest.mark.parametrize("hw, seg, dtype", [((4, 4), (16, 16), "float32"),
                                            ((3, 5), (13, 11), "float16")])
def test_iou_equals_naive_loop(tmp_path, hw, seg, dtype):
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((23, 5, *hw)).astype(np.float32)
    acts[:, 2] = np.maximum(acts[:, 2], 0)  # ReLU-like unit with ties at zero
    ds = TinyConcepts(23, seg)
    store = _store(tmp_path / "a.h5", acts, dtype)
    q = 0.05
    result = dissect(store, ds, quantile=q, batch_size=4, progress=False)
    ref_iou, ref_thr = _naive_iou(store["conv"][:].astype(np.float32), ds, q)
    np.testing.assert_array_equal(result.thresholds("conv"),
                                  np.quantile(store["conv"][:].transpose(1, 0, 2, 3)
                                              .reshape(5, -1), 1 - q, axis=1))
    np.testing.assert_array_equal(result.iou("conv"), ref_iou)
    assert result.concepts == ds.concepts and result.layers == ["conv"]


def test_unscored_and_out_of_table_labels_are_ignored(tmp_path):
    # label 9 is in no concept row (beyond the table's largest number), 6 is a gap in it
    rng = np.random.default_rng(5)
    acts = rng.standard_normal((9, 4, 4, 4)).astype(np.float32)
    ds = TinyConcepts(9, (16, 16), seed=3)
    ds.pixel[:, 0][rng.random(ds.pixel[:, 0].shape) < 0.2] = 9
    ds.pixel[:, 1][rng.random(ds.pixel[:, 1].shape) < 0.1] = 6
    store = _store(tmp_path / "a.h5", acts)
    result = dissect(store, ds, quantile=0.05, batch_size=4, progress=False)
    ref_iou, _ = _naive_iou(store["conv"][:], ds, 0.05)
    np.testing.assert_array_equal(result.iou("conv"), ref_iou)


def test_layers_share_one_pass_over_the_annotations(tmp_path):
    rng = np.random.default_rng(8)
    acts = {"a": rng.standard_normal((11, 3, 4, 4)).astype(np.float32),
            "b": rng.standard_normal((11, 5, 3, 5)).astype(np.float32)}
    path = tmp_path / "two.h5"
    create_store(path, n=11, layers={k: v.shape[1:] for k, v in acts.items()},
                 dtype="float32", pool=None, attrs={})
    with StoreWriter(path) as w:
        w.write(0, np.arange(11), acts, {k: v.max(axis=(2, 3)) for k, v in acts.items()})
        w.finish()
    store = ActivationStore(path)

    class Counting(TinyConcepts):
        reads = 0

        def __getitem__(self, i: int) -> dict:
            Counting.reads += 1
            return super().__getitem__(i)

    ds = Counting(11, (16, 16), seed=2)
    both = dissect(store, ds, ["a", "b"], quantile=0.05, batch_size=4, progress=False)
    assert Counting.reads == 11  # one pass for both layers
    for name in ("a", "b"):
        alone = dissect(store, ds, [name], quantile=0.05, batch_size=4, progress=False)
        np.testing.assert_array_equal(both.iou(name), alone.iou(name))
        np.testing.assert_array_equal(both.thresholds(name), alone.thresholds(name))
        ref, _ = _naive_iou(acts[name], ds, 0.05)
        np.testing.assert_array_equal(both.iou(name), ref)


def test_annotated_category_rule(tmp_path):
    """A unit active everywhere; 'rim' covers half of image 0; 'part' annotated on image 0 only."""
    ds = TinyConcepts(2, (4, 4))
    ds.pixel[:] = 0
    ds.pixel[0, 1, :2] = 4
    ds.annotated[:] = [[True, True, False], [True, False, False]]
    ds.image = [np.zeros(0, dtype=np.int64)] * 2
    acts = np.full((2, 1, 2, 2), 2.0, dtype=np.float32)
    acts[0, 0, 0, 0] = 1.0
    store = _store(tmp_path / "r.h5", acts)
    res = dissect(store, ds, quantile=0.9, batch_size=1, progress=False)
    # T = quantile(values, 0.1) = 1.3 (values: one 1.0 and seven 2.0); active: pixels > 1.3
    up = F.interpolate(torch.from_numpy(acts), size=(4, 4), mode="bilinear", align_corners=False)
    active = (up > float(res.thresholds("conv")[0]))[:, 0].numpy()
    inter = (active[0] & (ds.pixel[0, 1] == 4)).sum()
    expected = inter / (active[0].sum() + 8 - inter)  # A over image 0 only (part annotated)
    rim = [c.name for c in res.concepts].index("rim")
    assert res.iou("conv")[0, rim] == pytest.approx(expected, rel=1e-15)
    wrong = inter / (active.sum() + 8 - inter)
    assert expected != wrong


class Planted(nn.Module):
    """Units that compute known concepts of SyntheticConcepts from the pixels.

    0 red, 1 green, 2 blue (exact palette matches), 3 horizontal stripes, 4 shape interior.
    Every unit is 1 + an indicator, so any quantile above the concept's frequency puts the
    threshold at 1 and the active region is exactly the indicator's region.
    """

    def __init__(self) -> None:
        super().__init__()
        colors = torch.tensor([PALETTE[c] for c in ("red", "green", "blue")]) / 255.0
        shapes = torch.tensor([PALETTE[c] for c in SHAPE_COLORS]) / 255.0
        self.register_buffer("colors", colors.view(3, 3, 1, 1))
        self.register_buffer("shapes", shapes.view(-1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        match = lambda ref: ((x[:, None] - ref[None]).abs().amax(dim=2) < 0.02).float()  # noqa: E731
        colors = match(self.colors)  # (B, 3, H, W)
        dy = (x[:, :, 1:] - x[:, :, :-1]).abs().sum(1, keepdim=True)
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum(1, keepdim=True)
        dy = F.pad(dy, (0, 0, 0, 1))
        dx = F.pad(dx, (0, 1, 0, 0))
        energy = F.avg_pool2d(dy, 9, 1, 4) - 3 * F.avg_pool2d(dx, 9, 1, 4)
        stripes = (energy > 0.05).float()
        fg = match(self.shapes).amax(dim=1, keepdim=True)
        interior = -F.max_pool2d(-fg, 9, 1, 4)
        return 1.0 + torch.cat([colors, stripes, interior], dim=1)


def test_planted_units_are_labelled_with_their_concepts(tmp_path):
    ds = SyntheticConcepts(120, size=64, seed=3)
    model = nn.Sequential(Planted())
    res = dissect(model, ds, layers=["0"], quantile=0.5, batch_size=32, progress=False,
                  store_path=tmp_path / "planted.h5")
    units = res.units("0")
    got = [(u.concept, u.category) for u in units]
    assert got == [("red", "color"), ("green", "color"), ("blue", "color"),
                   ("striped", "texture"), ("interior", "part")]
    assert [u.iou for u in units[:3]] == [1.0, 1.0, 1.0]  # exact masks, exact counts
    assert units[3].iou > 0.5 and units[4].iou > 0.6
    assert all(u.is_detector for u in units)


def test_result_outputs(tmp_path):
    rng = np.random.default_rng(2)
    acts = rng.standard_normal((12, 4, 3, 3)).astype(np.float32)
    ds = TinyConcepts(12, (6, 6))
    res = dissect(_store(tmp_path / "a.h5", acts), ds, quantile=0.1, progress=False, k=3)
    assert res.top_images("conv").shape == (4, 3)
    np.testing.assert_array_equal(res.top_images("conv")[:, 0], acts.max(axis=(2, 3)).argmax(0))
    (path,) = res.to_csv(tmp_path / "csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["unit", "category", "label", "score", "color-label", "color-iou",
                      "part-label", "part-iou", "scene-label", "scene-iou"]
    again = DissectionResult.from_json(res.to_json(tmp_path / "r.json"))
    np.testing.assert_array_equal(again.iou("conv"), res.iou("conv"))
    assert again.units("conv") == res.units("conv")
    assert json.loads((tmp_path / "r.json").read_text())["layers"]["conv"]["units"][0]["unit"] == 0
    best = res.units("conv", category="scene")
    assert {u.category for u in best} == {"scene"}
    assert "conv" in res.summary() and "detectors" in res.summary()
    only = dissect(_store(tmp_path / "b.h5", acts), ds, quantile=0.1, progress=False,
                   categories=["part"])
    assert [c.name for c in only.concepts] == ["edge", "rim"]
    np.testing.assert_array_equal(only.iou("conv"), res.iou("conv")[:, 2:4])


def test_bad_input(tmp_path, tiny, images):
    ds = TinyConcepts(10, (8, 8))
    store = capture(tiny, images, ["0", "7"], tmp_path / "s.h5", progress=False)
    with pytest.raises(DissectError, match="spatial maps"):
        dissect(store, ds, layers=["7"], progress=False)
    with pytest.raises(DissectError, match="not in"):
        dissect(store, ds, layers=["3"], progress=False)
    with pytest.raises(DissectError, match="quantile"):
        dissect(store, ds, layers=["0"], quantile=0, progress=False)
    with pytest.raises(DissectError, match="unknown categories"):
        dissect(store, ds, layers=["0"], categories=["smell"], progress=False)
    with pytest.raises(DissectError, match="ConceptDataset"):
        dissect(store, images, layers=["0"], progress=False)
    with pytest.raises(DissectError, match="layers="):
        dissect(tiny, ds, progress=False)


@pytest.mark.slow
def test_cli_and_reproduction_script_on_written_broden(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from dissect.cli import main
    from dissect.datasets import write_broden

    root = write_broden(SyntheticConcepts(12, size=64, seed=5), tmp_path / "broden")
    out = tmp_path / "cli"
    assert main(["netdissect", "torchvision:resnet18", "--dataset", f"broden:{root}",
                 "--layers", "layer2,layer3", "--out", str(out), "--batch-size", "5",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "layer2" in printed and "detectors" in printed
    assert (out / "layer3.csv").is_file() and (out / "netdissect.json").is_file()
    assert not (out / "netdissect.ckpt").exists()  # checkpointed while counting, removed after
    assert len(list((out / "units" / "layer3").glob("unit_*.png"))) == 64  # for the report
    assert main(["report", str(out), "--quiet"]) == 0
    assert (out / "report" / "layer-layer3.html").is_file()
    script = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_netdissect.py"
    spec = importlib.util.spec_from_file_location("reproduce_netdissect", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--broden", str(root), "--out", str(tmp_path / "rep"), "--quiet",
                        "--layers", "layer3,layer4", "--batch-size", "6"]) == 0
    table = capsys.readouterr().out
    assert "layer4" in table and "texture" in table and "unique" in table
    assert module.main(["--broden", str(tmp_path / "missing"), "--quiet"]) == 2
