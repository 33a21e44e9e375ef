"""`dissect similarity` writes CKA and geometry results that `dissect report` shows on a
Layers page; the Python API is reachable from `dissect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import dissect
from dissect.cli import main
from dissect.datasets import SyntheticConcepts
from dissect.hooks import capture
from dissect.similarity import SimilarityResult, cka


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 8, 3, 2, 1),
                          nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
    path = tmp_path_factory.mktemp("sim") / "acts.h5"
    data = SyntheticConcepts(24, size=112)
    capture(model, data, ["1", "3", "5"], path, pool="mean", progress=False,
            dataset="synthetic:24").close()
    return path


def test_cli_writes_results_that_the_report_renders(store_path, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["similarity", str(store_path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "CKA" in printed and "intrinsic dimension" in printed
    folder = out / "layers"
    result = SimilarityResult.from_json(folder / "similarity.json")
    assert result.rows == ["1", "3", "5"] and result.matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-12)
    nearest = json.loads((folder / "nearest.json").read_text())
    assert [e["layer"] for e in nearest["entries"]] == ["3", "5"]
    for entry in nearest["entries"]:  # a query never finds itself
        for query, rows in zip(entry["queries"], entry["rows"], strict=True):
            assert query not in rows
    assert len(list((folder / "nearest").glob("row_*.png"))) == len(nearest["images"]) > 4
    assert np.load(folder / "labels.npy").shape == (24,)
    assert main(["report", str(out), "--quiet"]) == 0
    page = (out / "report" / "layers.html").read_text()
    for heading in ("Layer similarity (CKA)", "Intrinsic dimension", "PCA of 5",
                    "Nearest examples in 3", "Nearest examples in 5"):
        assert heading in page
    assert page.count('src="img/layers/nearest/') == sum(
        len(e["queries"]) * (1 + len(e["rows"][0])) for e in nearest["entries"])
    assert 'href="layers.html"' in (out / "report" / "index.html").read_text()


def test_cli_two_stores_and_cka_only(store_path, tmp_path, capsys):
    out = tmp_path / "two"
    assert main(["similarity", str(store_path), "--other", str(store_path), "--out", str(out),
                 "--layers", "1,5", "--other-layers", "3", "--no-geometry", "--debiased",
                 "--quiet"]) == 0
    result = SimilarityResult.from_json(out / "layers" / "similarity.json")
    assert result.matrix.shape == (2, 1)
    assert not (out / "layers" / "intrinsic_dimension.json").exists()


def test_top_level_names():
    assert dissect.cka is cka
    x = np.random.default_rng(0).standard_normal((20, 5))
    assert dissect.cka(x, x) == pytest.approx(1.0)
    for name in ("cka_matrix", "SimilarityResult", "embed", "Embedding", "intrinsic_dimension",
                 "intrinsic_dimension_curve", "distance_concentration",
                 "distance_concentration_curve", "LayerCurve"):
        assert getattr(dissect, name).__name__ == name


def test_cli_defaults_to_the_store_folder(store_path, capsys):
    assert main(["similarity", str(store_path), "--no-geometry", "--quiet"]) == 0
    assert (store_path.parent / "layers" / "similarity.json").is_file()
