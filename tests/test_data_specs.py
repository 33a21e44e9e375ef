"""Data-source specs from Python (#21): one resolver for every function that takes data, and
``Trace.run`` / ``trace`` (the form of ``stop=True`` without the trap)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TinyCNN

from dissect._plumbing.images import write_png
from dissect.ablation import ablate
from dissect.datasets import (
    ImageFolder,
    SampleImages,
    SyntheticConcepts,
    resolve_data,
)
from dissect.deconvnet import top_patches
from dissect.errors import DataError, DissectError
from dissect.hooks import Trace, capture, trace
from dissect.netdissect import dissect, explain
from dissect.probes import probe


@pytest.fixture
def cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def _hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------------------- the resolver


def test_resolve_data_specs_and_objects(tmp_path: Path) -> None:
    ds, spec = resolve_data("synthetic:5")
    assert isinstance(ds, SyntheticConcepts) and len(ds) == 5 and spec == "synthetic:5"
    ds, spec = resolve_data("samples")
    assert isinstance(ds, SampleImages) and len(ds) > 0 and spec == "samples"
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    for given in (folder, str(folder)):  # a Path is a spec too
        ds, spec = resolve_data(given)
        assert isinstance(ds, ImageFolder) and len(ds) == 3 and spec == str(folder)
    obj = SyntheticConcepts(3)
    assert resolve_data(obj) == (obj, None)
    x = torch.zeros(2, 3, 4, 4)
    assert resolve_data(x)[0] is x and resolve_data(x)[1] is None
    flipped, _ = resolve_data("synthetic:2", transform=lambda im: im.flip(0))
    assert torch.equal(flipped[0]["image"], SyntheticConcepts(2)[0]["image"].flip(0))


def test_a_folder_with_labels_csv_is_a_segmentation_folder(cnn: TinyCNN,
                                                          tmp_path: Path) -> None:
    from dissect.datasets import SegmentationFolder

    root = tmp_path / "masks_folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels.csv").write_text("number,name,category\n1,red,color\n")
    for i in range(4):
        image = np.zeros((16, 16, 3), np.uint8)
        image[4 * i % 16:, :8, 0] = 255
        write_png(root / "images" / f"{i}.png", image)
        mask = np.zeros((8, 8), np.uint8)
        mask[2 * i % 8:, :4] = 1
        cv2.imwrite(str(root / "masks" / f"{i}.color.png"), mask)  # one channel
    for given in (root, str(root)):
        ds, spec = resolve_data(given)
        assert isinstance(ds, SegmentationFolder) and len(ds) == 4 and spec == str(root)
    # the spec reaches a dissection: the same IoUs as the dataset object
    by_spec = dissect(cnn, str(root), layers=["1"], progress=False)
    by_object = dissect(cnn, SegmentationFolder(root), layers=["1"], progress=False)
    assert np.array_equal(by_spec.iou("1"), by_object.iou("1"))
    assert [c.name for c in by_spec.concepts] == ["red"]


@pytest.mark.parametrize("bad", ["synthetic:abc", "nonexistent/folder", "hello", ""])
def test_bad_spec_names_the_accepted_forms(bad: str) -> None:
    with pytest.raises(DataError, match=r"synthetic:N.*broden:PATH.*samples.*folder"):
        resolve_data(bad)


def test_capture_of_a_bad_spec_is_a_clear_error(cnn: TinyCNN, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data source 'hello'") as info:
        capture(cnn, "hello", ["0"], tmp_path / "a.h5", progress=False)
    assert "data items" not in str(info.value)
    assert not (tmp_path / "a.h5").exists()


# --------------------------------------------------------------------------- capture + probe


def test_capture_of_a_spec_records_it_and_probe_reads_targets(cnn: TinyCNN,
                                                             tmp_path: Path) -> None:
    with capture(cnn, "synthetic:12", ["3"], tmp_path / "spec.h5", batch_size=5,
                 dtype="float32", pool="mean", progress=False) as store:
        assert store.meta["dataset"] == "synthetic:12"
        by_spec = np.asarray(store["3"][:])
        res = probe(store, labels="targets", control=False, test_size=4, progress=False)
        assert res.layers == ["3"]
    with capture(cnn, SyntheticConcepts(12), ["3"], tmp_path / "obj.h5", batch_size=5,
                 dtype="float32", pool="mean", progress=False) as store:
        assert "dataset" not in store.meta  # an object records no spec
        np.testing.assert_array_equal(np.asarray(store["3"][:]), by_spec)


def test_capture_keeps_an_explicit_dataset_attribute(cnn: TinyCNN, tmp_path: Path) -> None:
    with capture(cnn, "synthetic:4", ["0"], tmp_path / "a.h5", dataset="synthetic:4 (mine)",
                 pool="mean", progress=False) as store:
        assert store.meta["dataset"] == "synthetic:4 (mine)"


# --------------------------------------------------------------------------- analyses


def test_dissect_explain_ablate_top_patches_accept_specs(cnn: TinyCNN, tmp_path: Path) -> None:
    res = dissect(cnn, "synthetic:8", layers=["0"], store_path=tmp_path / "d.h5",
                  quantile=0.2, progress=False)
    direct = dissect(cnn, SyntheticConcepts(8), layers=["0"], quantile=0.2, progress=False)
    assert [u.iou for u in res.units("0")] == [u.iou for u in direct.units("0")]
    with capture(cnn, "synthetic:8", ["0"], tmp_path / "e.h5", progress=False) as store:
        ex = explain(store, "synthetic:8", "0", [0, 1], length=2, quantile=0.2,
                     progress=False, annotation_cache=False)
        assert len(ex) == 2
    ab = ablate(cnn, "synthetic:8", "3", [0, 1], progress=False)
    assert ab.ablated.shape[0] == 2
    top = top_patches(cnn, "synthetic:8", "3", [0], k=2, progress=False)
    assert top.images.shape[:2] == (1, 2)


def test_concept_analyses_refuse_a_spec_without_concepts(cnn: TinyCNN) -> None:
    with pytest.raises(DissectError, match="needs a ConceptDataset"):
        dissect(cnn, "samples", layers=["0"], progress=False)


# --------------------------------------------------------------------------- Trace.run, trace


def test_trace_run_stops_without_the_trap(cnn: TinyCNN) -> None:
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        full = torch.nn.Sequential(*list(cnn)[:4])(x)
    after = []
    tr = Trace(cnn, ["0", "3"], stop=True).run(x)
    after.append("ran")  # the statement after the call runs (inside a with block it would not)
    assert after == ["ran"]
    assert torch.equal(tr.outputs["3"], full)
    assert _hooks_left(cnn) == 0
    assert tr.calls["3"] == 1 and "0" in tr.outputs
    again = tr.run(x[:1])  # each run starts afresh
    assert again is tr and tr.outputs["3"].shape[0] == 1


def test_trace_function_returns_the_outputs(cnn: TinyCNN) -> None:
    x = torch.rand(2, 3, 16, 16)
    out = trace(cnn, x, ["3", "0"])
    assert list(out) == ["3", "0"]  # in the order asked
    with torch.no_grad():
        assert torch.equal(out["3"], torch.nn.Sequential(*list(cnn)[:4])(x))
    assert not out["3"].requires_grad
    assert _hooks_left(cnn) == 0
    pooled = trace(cnn, x, "3", record=lambda name, t: t.mean(dim=(2, 3)))
    assert pooled["3"].shape == (2, 6)
    with pytest.raises(DissectError, match="no backward pass"):
        trace(cnn, x, "3", grads=True)


def test_a_model_dissected_from_a_spec_records_it(tmp_path):
    from torch import nn

    from dissect import ActivationStore
    from dissect.netdissect import dissect

    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))
    dissect(model, "synthetic:6", ["0"], store_path=tmp_path / "d.h5", progress=False)
    with ActivationStore(tmp_path / "d.h5") as store:
        assert store.meta["dataset"] == "synthetic:6"


def test_a_string_never_reaches_the_batch_source_as_items():
    import torch

    from dissect.errors import DataError
    from dissect.hooks.source import BatchSource

    with pytest.raises(DataError, match="is a string"):
        BatchSource("synthetic:200", 4, 0, torch.device("cpu"))
