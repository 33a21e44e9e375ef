"""dissect.geometry: PCA against the SVD, TwoNN against known dimensions and scikit-dimension,
distance concentration against brute force, t-SNE/UMAP when installed, the results' files."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from dissect import DissectError
from dissect.geometry import (
    Embedding,
    LayerCurve,
    distance_concentration,
    distance_concentration_curve,
    embed,
    intrinsic_dimension,
    intrinsic_dimension_curve,
    twonn_fit,
)
from dissect.store import ActivationStore, StoreWriter, create_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _store(path, acts: dict[str, np.ndarray]) -> ActivationStore:
    n = len(next(iter(acts.values())))
    create_store(path, n=n, layers={k: v.shape[1:] for k, v in acts.items()}, dtype="float32",
                 pool=None, attrs={})
    with StoreWriter(path) as w:
        w.write(0, np.arange(n) + 1000, {k: v.astype(np.float32) for k, v in acts.items()},
                {k: v.reshape(n, v.shape[1], -1).max(axis=2) for k, v in acts.items()})
        w.finish()
    return ActivationStore(path)


def _subspace(n: int, intrinsic: int, ambient: int, seed: int) -> np.ndarray:
    """Points uniform in a ``intrinsic``-dimensional cube, mapped linearly into ``ambient``."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(ambient, intrinsic)))
    return rng.uniform(-1, 1, size=(n, intrinsic)) @ basis.T + 0.5


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(150, 6, 4, 4)) * np.arange(1, 7)[None, :, None, None]
    return _store(tmp_path / "s.h5", {
        "conv": conv,
        "low": _subspace(150, 3, 12, 1),
        "wide": rng.normal(size=(150, 40)),
    })


# --------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_pca_equals_the_svd_projection_up_to_sign(store, pool):
    emb = embed(store, "conv", dims=3, pool=pool, batch_size=32, progress=False)
    raw = store["conv"][:].astype(np.float64)
    x = raw.mean(axis=(2, 3)) if pool == "mean" else raw.reshape(len(raw), -1)
    xc = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:3].T
    signs = np.sign((emb.coordinates * ref).sum(axis=0))
    np.testing.assert_allclose(emb.coordinates, ref * signs, atol=1e-8)
    np.testing.assert_allclose(emb.explained_variance, s[:3] ** 2 / (len(x) - 1), rtol=1e-9)
    np.testing.assert_allclose(emb.explained_variance_ratio, s[:3] ** 2 / (s ** 2).sum(),
                               rtol=1e-9)
    np.testing.assert_allclose(emb.components @ emb.components.T, np.eye(3), atol=1e-10)
    big = np.abs(emb.components).argmax(axis=1)  # the sign convention: largest entry positive
    assert (emb.components[np.arange(3), big] > 0).all()
    np.testing.assert_allclose((x - emb.mean) @ emb.components.T, emb.coordinates, atol=1e-9)
    assert emb.method == "pca" and emb.layer == "conv" and emb.coordinates.shape == (150, 3)
    assert emb.index.tolist() == list(range(1000, 1150))


def test_pca_in_memory_svd_for_wide_layers_matches_the_streamed_one(store, monkeypatch):
    import dissect.geometry.embedding as embedding

    streamed = embed(store, "wide", dims=4, progress=False)
    monkeypatch.setattr(embedding, "STREAM_MAX_DIM", 10)
    in_memory = embed(store, "wide", dims=4, progress=False)
    np.testing.assert_allclose(in_memory.coordinates, streamed.coordinates, atol=1e-8)
    np.testing.assert_allclose(in_memory.components, streamed.components, atol=1e-9)


def test_embed_errors(store):
    with pytest.raises(DissectError, match="method must be"):
        embed(store, "conv", method="isomap", progress=False)
    with pytest.raises(DissectError, match="dims=7"):
        embed(store, "conv", dims=7, progress=False)
    with pytest.raises(DissectError, match="pool='mean'"):
        embed(store, "conv", pool=None, progress=False)
    with pytest.raises(DissectError, match="options"):
        embed(store, "conv", options={"perplexity": 5}, progress=False)


@pytest.mark.parametrize(("method", "module"), [("tsne", "openTSNE"), ("umap", "umap")])
def test_a_missing_library_names_the_geometry_extra(store, monkeypatch, method, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(DissectError, match=r"torch-dissect\[geometry\]"):
        embed(store, "wide", method=method, progress=False)


def test_a_failing_import_statement_also_names_the_extra(store, monkeypatch):
    import builtins

    real = builtins.__import__

    def without_open_tsne(name, *args, **kwargs):
        if name.split(".")[0] == "openTSNE":
            raise ImportError("No module named 'openTSNE'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_open_tsne)
    with pytest.raises(DissectError, match="needs openTSNE.*geometry"):
        embed(store, "wide", method="tsne", progress=False)


@pytest.mark.skipif(importlib.util.find_spec("openTSNE") is None, reason="openTSNE missing")
def test_tsne_embedding_is_seeded(store):
    one = embed(store, "low", method="tsne", seed=3, progress=False)
    two = embed(store, "low", method="tsne", seed=3, progress=False)
    assert one.coordinates.shape == (150, 2) and np.isfinite(one.coordinates).all()
    np.testing.assert_array_equal(one.coordinates, two.coordinates)
    assert one.explained_variance is None
    three = embed(store, "low", method="tsne", dims=3, options={"n_iter": 50},
                  progress=False)
    assert three.coordinates.shape == (150, 3)


@pytest.mark.slow  # umap-learn compiles its numba kernels on first use (~10 s)
@pytest.mark.skipif(importlib.util.find_spec("umap") is None, reason="umap-learn missing")
def test_umap_embedding_is_seeded(store):
    one = embed(store, "low", method="umap", seed=1, options={"n_epochs": 50},
                progress=False)
    two = embed(store, "low", method="umap", seed=1, options={"n_epochs": 50},
                progress=False)
    assert one.coordinates.shape == (150, 2)
    np.testing.assert_array_equal(one.coordinates, two.coordinates)


def test_embedding_files_and_figures(store, tmp_path):
    emb = embed(store, "conv", progress=False)
    path = emb.to_json(tmp_path)
    assert path.name == "embedding.json"
    back = Embedding.from_json(path)
    np.testing.assert_array_equal(back.coordinates, emb.coordinates)
    np.testing.assert_array_equal(back.explained_variance_ratio, emb.explained_variance_ratio)
    np.testing.assert_array_equal(back.index, emb.index)
    assert back.method == "pca" and back.layer == "conv"
    labels = np.arange(150) % 4
    fig = emb.plot(labels=labels)
    assert fig.axes[0].get_legend() is not None
    assert emb.plot(labels=labels.astype(float), path=tmp_path / "e.png").exists()
    assert emb.plot(path=tmp_path).name == "embedding.png"
    with pytest.raises(DissectError, match="one entry per row"):
        emb.plot(labels=labels[:10])
    assert "explained variance" in emb.summary()


# --------------------------------------------------------------------------- TwoNN


@pytest.mark.parametrize("intrinsic", [2, 5])
def test_twonn_recovers_the_dimension_of_a_subspace(tmp_path, intrinsic):
    s = _store(tmp_path / "sub.h5", {"x": _subspace(1500, intrinsic, 30, intrinsic)})
    estimate = intrinsic_dimension(s, "x", progress=False)
    assert abs(estimate - intrinsic) <= 0.2 * intrinsic


def test_twonn_equals_scikit_dimension(store):
    skdim = pytest.importorskip("skdim")
    for layer in ("low", "wide", "conv"):
        raw = store[layer][:].astype(np.float64)
        x = raw.mean(axis=(2, 3)) if raw.ndim == 4 else raw
        ours = intrinsic_dimension(store, layer, progress=False)
        theirs = skdim.id.TwoNN().fit(x).dimension_
        assert ours == pytest.approx(theirs, rel=1e-9)


def test_twonn_fit_matches_scikit_dimension_on_given_distances():
    skdim = pytest.importorskip("skdim")
    rng = np.random.default_rng(3)
    r1 = rng.uniform(0.5, 1.0, size=200)
    r2 = r1 * (1 + rng.pareto(4.0, size=200))
    for fraction in (0.01, 0.1, 0.3):
        theirs = skdim.id.TwoNN(discard_fraction=fraction, dist=True).fit(
            np.column_stack([r1, r2])).dimension_
        assert twonn_fit(r1, r2, fraction) == pytest.approx(theirs, rel=1e-12)


def test_twonn_by_hand_and_duplicates():
    r1 = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    r2 = np.array([2.0, 3.0, 4.0, 5.0, 1.0])  # the duplicate (r1 = 0) is dropped
    mu = np.sort(r2[:4] / r1[:4])[:3]  # int(4 * 0.9) = 3 ratios kept
    x, y = np.log(mu), -np.log(1 - np.arange(1, 4) / 4)
    assert twonn_fit(r1, r2) == pytest.approx(float(x @ y / (x @ x)))
    for bad in (0.0, 1.0):
        with pytest.raises(DissectError, match="discard_fraction"):
            twonn_fit(r1, r2, bad)


def test_intrinsic_dimension_subsamples_rows_with_a_seed(tmp_path):
    s = _store(tmp_path / "sub.h5", {"x": _subspace(600, 3, 10, 4)})
    a = intrinsic_dimension(s, "x", max_rows=300, seed=1, progress=False)
    b = intrinsic_dimension(s, "x", max_rows=300, seed=1, progress=False)
    c = intrinsic_dimension(s, "x", max_rows=300, seed=2, progress=False)
    assert a == b and a != c and abs(a - 3) < 0.6
    with pytest.raises(DissectError, match="method must be"):
        intrinsic_dimension(s, "x", method="mle", progress=False)


# --------------------------------------------------------------------------- concentration


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_distance_concentration_equals_brute_force(store, metric):
    x = store["wide"][:].astype(np.float64)
    value = distance_concentration(store, "wide", queries=len(x), metric=metric, batch_size=16,
                                   progress=False)
    if metric == "euclidean":
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    else:
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = np.clip(1 - u @ u.T, 0, 2)
    np.fill_diagonal(d, np.nan)
    ref = np.mean((np.nanmax(d, 1) - np.nanmin(d, 1)) / np.nanmin(d, 1))
    assert value == pytest.approx(ref, rel=1e-9)


def test_distances_concentrate_in_high_dimensions(tmp_path):
    rng = np.random.default_rng(5)
    s = _store(tmp_path / "d.h5", {"low": rng.normal(size=(300, 2)),
                                   "high": rng.normal(size=(300, 200))})
    low = distance_concentration(s, "low", queries=50, progress=False)
    high = distance_concentration(s, "high", queries=50, progress=False)
    assert high < 1 < low
    assert distance_concentration(s, "low", queries=50, progress=False) == low  # seeded


# --------------------------------------------------------------------------- curves


def test_curves_across_layers(store, tmp_path):
    curve = intrinsic_dimension_curve(store, ["low", "wide"], progress=False)
    assert curve.layers == ["low", "wide"] and curve.values.shape == (2,)
    assert curve["low"] == pytest.approx(intrinsic_dimension(store, "low", progress=False))
    assert curve.values[0] < curve.values[1]  # 3-D data vs 40-D noise
    path = curve.to_json(tmp_path)
    back = LayerCurve.from_json(path)
    np.testing.assert_array_equal(back.values, curve.values)
    assert back.measure == "intrinsic_dimension" and back.layers == curve.layers
    assert curve.plot().axes and curve.plot(tmp_path).name == "intrinsic_dimension.png"
    assert curve.to_csv(tmp_path).read_text().splitlines()[0] == "layer,intrinsic_dimension"
    assert "low" in curve.summary()
    contrast = distance_concentration_curve(store, queries=20, progress=False)
    assert contrast.layers == store.layers and contrast.measure == "relative_contrast"
    assert np.all(contrast.values > 0)


# --------------------------------------------------------------------------- GPU tier


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_geometry_on_cuda_equals_the_cpu(store):
    cpu = embed(store, "conv", dims=3, device="cpu", progress=False)
    gpu = embed(store, "conv", dims=3, device="cuda", progress=False)
    np.testing.assert_allclose(gpu.coordinates, cpu.coordinates, atol=1e-8)
    assert intrinsic_dimension(store, "low", device="cuda", progress=False) == pytest.approx(
        intrinsic_dimension(store, "low", device="cpu", progress=False), rel=1e-9)
    assert distance_concentration(store, "wide", device="cuda", progress=False) == (
        pytest.approx(distance_concentration(store, "wide", device="cpu", progress=False),
                      rel=1e-9))
