"""dissect.similarity: linear CKA against Gram-matrix references, the streamed matrix, nearest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dissect import DissectError
from dissect.hooks import capture
from dissect.similarity import NeighborSearch, SimilarityResult, cka, cka_matrix, nearest
from dissect.similarity.features import CountSketch
from dissect.similarity.linear_cka import feature_moments, gram_hsic, hsic
from dissect.store import ActivationStore, StoreWriter, create_store

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- references


def _hsic_gram(k: np.ndarray, ell: np.ndarray, debiased: bool) -> float:
    """The textbook estimators on Gram matrices: biased tr(K H L H), or Song et al.'s unbiased
    HSIC with zeroed diagonals."""
    n = len(k)
    if not debiased:
        h = np.eye(n) - 1.0 / n
        return float(np.trace(k @ h @ ell @ h))
    k, ell = k.copy(), ell.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(ell, 0)
    one = np.ones(n)
    return float((np.trace(k @ ell) + (one @ k @ one) * (one @ ell @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * one @ k @ ell @ one) / (n * (n - 3)))


def _cka_ref(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k, ell = x @ x.T, y @ y.T  # uncentred: the estimators centre (H) or are shift invariant
    return _hsic_gram(k, ell, debiased) / np.sqrt(
        _hsic_gram(k, k, debiased) * _hsic_gram(ell, ell, debiased))


def _store(path, acts: dict[str, np.ndarray], index=None, dtype="float32") -> ActivationStore:
    n = len(next(iter(acts.values())))
    create_store(path, n=n, layers={k: v.shape[1:] for k, v in acts.items()}, dtype=dtype,
                 pool=None, attrs={})
    with StoreWriter(path) as w:
        maxima = {k: v.reshape(n, v.shape[1], -1).max(axis=2) for k, v in acts.items()}
        w.write(0, np.arange(n) if index is None else np.asarray(index),
                {k: v.astype(dtype) for k, v in acts.items()}, maxima)
        w.finish()
    return ActivationStore(path)


def _acts(n: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    """Three related layers: a map (C=4, 3x3), a linear read-out of its means, and noise."""
    rng = np.random.default_rng(seed)
    conv = rng.normal(size=(n, 4, 3, 3)).astype(np.float32)
    mix = conv.mean(axis=(2, 3)) @ rng.normal(size=(4, 6))
    return {"conv": conv,
            "fc": (mix + 0.3 * rng.normal(size=(n, 6))).astype(np.float32),
            "noise": rng.normal(size=(n, 5)).astype(np.float32)}


def _pooled(acts: dict[str, np.ndarray], pool: str = "mean") -> dict[str, np.ndarray]:
    out = {}
    for name, a in acts.items():
        a = a.astype(np.float64)
        if a.ndim > 2:
            a = a.mean(axis=(2, 3)) if pool == "mean" else a.reshape(len(a), -1)
        out[name] = a
    return out


# --------------------------------------------------------------------------- cka()


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 7, 5), (12, 30, 40)])  # feature space, Gram space
def test_cka_equals_the_gram_matrix_reference(debiased, shape):
    n, d1, d2 = shape
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d1)) + 2.0
    y = rng.normal(size=(n, d2)) - 1.0
    y[:, :5] += 0.7 * x[:, :5]
    assert cka(x, y, debiased=debiased) == pytest.approx(_cka_ref(x, y, debiased), abs=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_space_and_gram_space_estimators_agree(debiased):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(40, 6)) + 5)
    y = torch.from_numpy(rng.normal(size=(40, 9)))
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, ell = xc @ xc.T, yc @ yc.T
    assert hsic(feature_moments(x, y, debiased), debiased) == pytest.approx(
        gram_hsic(k, ell, debiased), rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(debiased):
    x = np.random.default_rng(3).normal(size=(50, 8))
    assert cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_scaling_and_shifts(debiased):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 10))
    y = x[:, :6] @ rng.normal(size=(6, 6)) + 0.5 * rng.normal(size=(80, 6))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    base = cka(x, y, debiased=debiased)
    assert cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert cka(7.5 * x, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert cka(x + 3.0, y - 1.0, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert cka(y, x, debiased=debiased) == pytest.approx(base, abs=1e-12)  # symmetric


def test_debiased_cka_of_independent_gaussians_is_near_zero():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(256, 64)), rng.normal(size=(256, 64))
    assert abs(cka(x, y, debiased=True)) < 0.03
    assert 0.15 < cka(x, y) < 0.25  # the biased one: about D / (N + D) = 0.2


def test_cka_takes_tensors_of_any_float_dtype():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.normal(size=(30, 3)).astype(np.float32)
    assert cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(cka(x, y), abs=1e-12)
    assert isinstance(cka(x, y), float)


def test_cka_errors_are_clear():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(10, 3))
    with pytest.raises(DissectError, match="same rows"):
        cka(x, rng.normal(size=(9, 3)))
    with pytest.raises(DissectError, match="at least 4 rows"):
        cka(x[:3], x[:3, :2], debiased=True)
    with pytest.raises(DissectError, match="zero variance"):
        cka(x, np.ones((10, 2)))
    with pytest.raises(DissectError, match="zero variance"):
        cka(np.ones((10, 2)), x, debiased=True)
    with pytest.raises(DissectError, match="NaN"):
        cka(np.where(x > 1, np.nan, x), x)
    with pytest.raises(DissectError, match="2-D"):
        cka(x[:, 0], x)


# --------------------------------------------------------------------------- cka_matrix


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_the_reference_on_the_pooled_arrays(tmp_path, debiased):
    acts = _acts()
    store = _store(tmp_path / "s.h5", acts)
    result = cka_matrix(store, debiased=debiased, batch_size=32, progress=False)
    feats = _pooled(acts)
    names = list(acts)
    ref = np.array([[_cka_ref(feats[a], feats[b], debiased) for b in names] for a in names])
    assert result.rows == result.cols == names
    assert result.matrix.shape == (3, 3)
    np.testing.assert_allclose(result.matrix, ref, atol=1e-9)
    assert result.error is None
    assert result.settings["rows_compared"] == 120


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_in_several_passes_equals_one_pass(tmp_path, debiased):
    store = _store(tmp_path / "s.h5", _acts())
    one = cka_matrix(store, debiased=debiased, progress=False)
    several = cka_matrix(store, debiased=debiased, max_bytes=8 * 6 * 6, batch_size=50,
                         progress=False)
    assert one.settings["passes"] == 1 and several.settings["passes"] > 1
    np.testing.assert_allclose(several.matrix, one.matrix, atol=1e-12)


def test_cka_matrix_rows_and_columns_may_differ(tmp_path):
    acts = _acts()
    store = _store(tmp_path / "s.h5", acts)
    full = cka_matrix(store, progress=False)
    part = cka_matrix(store, ["noise", "conv"], other_layers=["fc", "conv"], progress=False)
    assert part.rows == ["noise", "conv"] and part.cols == ["fc", "conv"]
    np.testing.assert_allclose(part.matrix, full.matrix[np.ix_([2, 0], [1, 0])], atol=1e-12)
    assert part["conv", "fc"] == pytest.approx(full.matrix[0, 1])
    by_path = cka_matrix(str(store.path), other=store.path, progress=False)  # paths open too
    np.testing.assert_allclose(by_path.matrix, full.matrix, atol=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_of_two_stores(tmp_path, debiased):
    acts = _acts()
    rng = np.random.default_rng(8)
    other = {"a": (acts["fc"] @ rng.normal(size=(6, 3))).astype(np.float32),
             "b": rng.normal(size=(120, 2, 2, 2)).astype(np.float32)}
    s1 = _store(tmp_path / "one.h5", acts)
    s2 = _store(tmp_path / "two.h5", other)
    result = cka_matrix(s1, ["conv", "fc"], other=s2, debiased=debiased, progress=False)
    f1, f2 = _pooled(acts), _pooled(other)
    ref = np.array([[_cka_ref(f1[a], f2[b], debiased) for b in ["a", "b"]]
                    for a in ["conv", "fc"]])
    assert result.cols == ["a", "b"]
    np.testing.assert_allclose(result.matrix, ref, atol=1e-9)
    assert result.settings["other"] == str(s2.path)


def test_two_stores_must_index_the_same_rows(tmp_path):
    acts = _acts(n=20)
    s1 = _store(tmp_path / "one.h5", acts)
    shuffled = _store(tmp_path / "two.h5", acts, index=np.arange(20)[::-1])
    with pytest.raises(DissectError, match="same inputs"):
        cka_matrix(s1, other=shuffled, progress=False)
    shorter = _store(tmp_path / "three.h5", {k: v[:15] for k, v in acts.items()})
    with pytest.raises(DissectError, match="15"):
        cka_matrix(s1, other=shorter, progress=False)


def test_cka_matrix_pool_choices(tmp_path):
    acts = _acts(n=60)
    store = _store(tmp_path / "s.h5", acts)
    with pytest.raises(DissectError, match="pool='mean'"):
        cka_matrix(store, pool=None, progress=False)
    assert cka_matrix(store, ["fc", "noise"], pool=None, progress=False).matrix.shape == (2, 2)
    flat = cka_matrix(store, pool="flatten", progress=False)
    feats = _pooled(acts, "flatten")
    assert flat.matrix[0, 1] == pytest.approx(_cka_ref(feats["conv"], feats["fc"]), abs=1e-9)
    with pytest.raises(DissectError, match="pool must be"):
        cka_matrix(store, pool="max", progress=False)


@pytest.mark.parametrize("debiased", [False, True])
def test_wide_layers_are_sketched_within_the_stated_error(tmp_path, debiased):
    rng = np.random.default_rng(9)
    n = 200
    latent = rng.normal(size=(n, 4))
    wide = (latent @ rng.normal(size=(4, 8 * 16 * 16))).reshape(n, 8, 16, 16)
    wide += 0.1 * rng.normal(size=wide.shape)
    acts = {"wide": wide.astype(np.float32),
            "small": (latent @ rng.normal(size=(4, 5)) + rng.normal(size=(n, 5))).astype(
                np.float32)}
    store = _store(tmp_path / "s.h5", acts)
    result = cka_matrix(store, pool="flatten", max_dim=256, debiased=debiased, progress=False)
    feats = _pooled(acts, "flatten")
    exact = cka(feats["wide"], feats["small"], debiased=debiased)
    assert result.error is not None
    assert result.error[1, 1] == 0 and 0 < result.error[0, 1] < 0.5
    assert abs(result.matrix[0, 1] - exact) <= result.error[0, 1]
    assert result.matrix[0, 0] == pytest.approx(1.0)
    (info,) = result.settings["sketched"]
    assert info["layer"] == "wide" and info["features"] == 2048 and info["sketch_dims"] == 256
    again = cka_matrix(store, pool="flatten", max_dim=256, debiased=debiased, progress=False)
    np.testing.assert_array_equal(again.matrix, result.matrix)  # seeded


def test_count_sketch_keeps_inner_products_in_expectation():
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.normal(size=(2, 500)))
    estimates = [float(torch.prod(CountSketch(500, 64, s, torch.device("cpu"))(x), 0).sum())
                 for s in range(400)]
    exact = float(x[0] @ x[1])
    sd = np.sqrt((float(x[0] @ x[0]) * float(x[1] @ x[1]) + exact ** 2) / 64)
    assert abs(np.mean(estimates) - exact) < 4 * sd / np.sqrt(400)


def test_cka_matrix_refuses_constant_and_non_finite_layers(tmp_path):
    acts = _acts(n=30)
    flat = dict(acts, dead=np.zeros((30, 3), dtype=np.float32))
    store = _store(tmp_path / "dead.h5", flat)
    with pytest.raises(DissectError, match="'dead'.*zero variance"):
        cka_matrix(store, progress=False)
    bad = dict(acts)
    bad["fc"] = bad["fc"].copy()
    bad["fc"][17, 2] = np.nan
    with pytest.raises(DissectError, match="non-finite.*row 17"):
        cka_matrix(_store(tmp_path / "nan.h5", bad), batch_size=8, progress=False)
    with pytest.raises(DissectError, match="at least 4 rows"):
        cka_matrix(_store(tmp_path / "few.h5", {k: v[:3] for k, v in acts.items()}),
                   debiased=True, progress=False)
    with pytest.raises(DissectError, match="not in"):
        cka_matrix(store, ["fc", "nope"], progress=False)


def test_cka_matrix_of_a_captured_model(tmp_path, tiny):
    data = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    store = capture(tiny, data, ["0", "3", "7"], tmp_path / "c.h5", pool="mean",
                    dtype="float32", progress=False)
    result = cka_matrix(store, progress=False)
    feats = {name: store[name][:].astype(np.float64) for name in store.layers}
    ref = np.array([[_cka_ref(feats[a], feats[b]) for b in store.layers] for a in store.layers])
    np.testing.assert_allclose(result.matrix, ref, atol=1e-9)
    np.testing.assert_allclose(np.diag(result.matrix), 1.0)


def test_similarity_result_files_and_figures(tmp_path):
    store = _store(tmp_path / "s.h5", _acts(n=40))
    result = cka_matrix(store, debiased=True, progress=False)
    path = result.to_json(tmp_path)
    assert path.name == "similarity.json"
    assert json.loads(path.read_text())["format"] == "torch-dissect-similarity"
    back = SimilarityResult.from_json(path)
    np.testing.assert_array_equal(back.matrix, result.matrix)  # bit for bit
    assert back.rows == result.rows and back.settings["debiased"] is True
    assert "debiased CKA" in result.summary() and "conv" in result.summary()
    fig = result.plot()
    assert fig.axes and fig.axes[0].get_title().startswith("debiased CKA")
    png = result.plot(tmp_path / "cka.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = (result.to_csv(tmp_path)).read_text().splitlines()
    assert rows[0] == "layer,conv,fc,noise" and len(rows) == 4
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(DissectError, match="not a torch-dissect similarity result"):
        SimilarityResult.from_json(tmp_path / "bad.json")


# --------------------------------------------------------------------------- nearest


def _brute(data: np.ndarray, queries: np.ndarray, k: int, metric: str,
           exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    if metric == "euclidean":
        d = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    else:
        def unit(a):
            norm = np.linalg.norm(a, axis=1, keepdims=True)
            return a / np.where(norm > 0, norm, 1)
        d = np.clip(1 - (unit(queries)[:, None, :] * unit(data)[None, :, :]).sum(-1), 0, 2)
    if exclude is not None:
        d[np.arange(len(queries)), exclude] = np.inf
    rows = np.arange(len(data))
    idx = np.array([np.lexsort((rows, di))[:k] for di in d])
    dist = np.take_along_axis(d, idx, axis=1)
    return idx, np.sqrt(dist) if metric == "euclidean" else dist


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_equals_brute_force_with_ties(tmp_path, metric):
    rng = np.random.default_rng(11)
    data = rng.normal(size=(90, 6)).astype(np.float32)
    data[40] = data[3]  # exact ties: duplicates of rows 3 and 10
    data[77] = data[3]
    data[55] = data[10]
    data[60] = 2 * data[10]  # a cosine tie only
    store = _store(tmp_path / "s.h5", {"fc": data})
    d64 = data.astype(np.float64)
    rows = np.array([3, 10, 0, 89, 40])
    idx, dist = nearest(store, "fc", rows, k=6, metric=metric, batch_size=16, progress=False)
    ref_idx, ref_dist = _brute(d64, d64[rows], 6, metric, exclude=rows)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-12)
    assert idx[0, :2].tolist() == [40, 77]  # row 3's duplicates, lower row first
    assert 3 not in idx[0]
    vectors = rng.normal(size=(4, 6))
    vectors[1] = d64[10]
    idx, dist = nearest(store, "fc", vectors, k=5, metric=metric, batch_size=7, progress=False)
    ref_idx, ref_dist = _brute(d64, vectors, 5, metric)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-12)
    assert idx.shape == dist.shape == (4, 5) and idx.dtype == np.int64


def test_nearest_on_spatial_layers_pools_queries_too(tmp_path):
    acts = _acts(n=50)
    store = _store(tmp_path / "s.h5", acts)
    pooled = _pooled(acts)["conv"]
    raw_queries = acts["conv"][[5, 6]].astype(np.float64)
    by_raw = nearest(store, "conv", raw_queries, k=3, metric="euclidean", progress=False)
    by_pooled = nearest(store, "conv", pooled[[5, 6]], k=3, metric="euclidean", progress=False)
    np.testing.assert_array_equal(by_raw[0], by_pooled[0])
    assert by_raw[0][:, 0].tolist() == [5, 6]  # vector queries do not exclude their row
    flat = nearest(store, "conv", [5], k=3, pool="flatten", metric="euclidean", progress=False)
    ref, _ = _brute(_pooled(acts, "flatten")["conv"], _pooled(acts, "flatten")["conv"][[5]], 3,
                    "euclidean", exclude=np.array([5]))
    np.testing.assert_array_equal(flat[0], ref)


def test_nearest_errors(tmp_path):
    store = _store(tmp_path / "s.h5", _acts(n=10))
    with pytest.raises(DissectError, match="only 9 rows"):
        nearest(store, "fc", [0], k=10, progress=False)
    with pytest.raises(DissectError, match=r"\[0, 10\)"):
        nearest(store, "fc", [10], progress=False)
    with pytest.raises(DissectError, match="metric"):
        nearest(store, "fc", [0], metric="manhattan", progress=False)
    with pytest.raises(DissectError, match=r"\(Q, 6\)"):
        nearest(store, "fc", np.zeros((2, 5)), progress=False)
    with pytest.raises(DissectError, match="pool='mean'"):
        nearest(store, "conv", [0], pool=None, progress=False)


def test_neighbor_search_streams_any_blocks():
    rng = np.random.default_rng(12)
    data = torch.from_numpy(rng.normal(size=(100, 3)))
    queries = torch.from_numpy(rng.normal(size=(7, 3)))
    search = NeighborSearch(queries, 4, "euclidean")
    for start in range(0, 100, 3):  # blocks smaller than k
        search.add(start, data[start:start + 3])
    idx, dist = search.result()
    ref_idx, ref_dist = _brute(data.numpy(), queries.numpy(), 4, "euclidean")
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-12)


# --------------------------------------------------------------------------- GPU tier


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_and_nearest_on_cuda_equal_the_cpu(tmp_path, debiased):
    acts = _acts()
    store = _store(tmp_path / "s.h5", acts)
    cpu = cka_matrix(store, debiased=debiased, device="cpu", progress=False)
    gpu = cka_matrix(store, debiased=debiased, device="cuda", progress=False)
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=1e-10)
    sketched = [cka_matrix(store, pool="flatten", max_dim=16, device=d, progress=False).matrix
                for d in ("cpu", "cuda")]
    np.testing.assert_allclose(sketched[1], sketched[0], atol=1e-10)
    for metric in ("cosine", "euclidean"):
        a = nearest(store, "fc", [0, 3, 7], k=4, metric=metric, device="cpu", progress=False)
        b = nearest(store, "fc", [0, 3, 7], k=4, metric=metric, device="cuda", progress=False)
        np.testing.assert_array_equal(b[0], a[0])
        np.testing.assert_allclose(b[1], a[1], atol=1e-12)
    x = torch.from_numpy(_pooled(acts)["fc"]).cuda()
    y = torch.from_numpy(_pooled(acts)["noise"]).cuda()
    assert cka(x, y, debiased=debiased) == pytest.approx(
        cka(x.cpu(), y.cpu(), debiased=debiased), abs=1e-12)
