"""Linear probes: known orderings, sklearn agreement, random-label controls, memory paths, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from dissect import DataError, DissectError, LayerNotFoundError
from dissect.cli import main
from dissect.datasets import SyntheticConcepts
from dissect.hooks import capture
from dissect.probes import (
    LayerProbe,
    ProbeOptions,
    ProbeResult,
    dataset_targets,
    probe,
    stratified_split,
)
from dissect.store import ActivationStore, StoreWriter, create_store

sklearn = pytest.importorskip("sklearn")
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def make_store(path, acts: dict[str, np.ndarray], dtype: str = "float32") -> ActivationStore:
    """Write ``layer -> (N, ...)`` arrays as a complete store (as capture would)."""
    n = len(next(iter(acts.values())))
    create_store(path, n=n, layers={k: v.shape[1:] for k, v in acts.items()}, dtype=dtype,
                 pool=None, attrs={})
    maxima = {k: v.reshape(n, v.shape[1], -1).max(-1).astype(np.float32) if v.ndim > 2
              else v.astype(np.float32) for k, v in acts.items()}
    with StoreWriter(path) as w:
        w.write(0, np.arange(n), {k: v.astype(dtype) for k, v in acts.items()}, maxima)
        w.finish()
    return ActivationStore(path)


def graded(n: int = 400, d: int = 10, classes: int = 3, strengths=(0.0, 0.8, 1.6, 4.0),
           seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Layers whose features carry the label with growing signal-to-noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    acts = {}
    for i, s in enumerate(strengths):
        x = rng.normal(size=(n, d))
        x[:, :classes] += s * np.eye(classes)[y]
        acts[f"block{i}"] = x.astype(np.float32)
    return acts, y


def sk_fit(xtr, ytr, reg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=1.0 / (reg * len(xtr)), tol=1e-8, max_iter=5000).fit(xtr, ytr)


# --------------------------------------------------------------------------- known answers


def test_label_decodable_only_in_later_layers_orders_accuracy(tmp_path):
    acts, y = graded()
    result = probe(make_store(tmp_path / "a.h5", acts), y, progress=False)
    test = [result[f"block{i}"].test_accuracy for i in range(4)]
    assert test == sorted(test) and test[0] < test[1] < test[3]
    assert abs(test[0] - result["block0"].chance) < 0.12 and test[3] > 0.95
    assert result.layers == ["block0", "block1", "block2", "block3"]
    sel = [result[f"block{i}"].selectivity for i in range(4)]
    assert sel[0] < 0.12 and sel[3] > 0.5
    # few features, many samples: the control cannot memorize, the informative layer is trusted
    assert not result["block3"].flagged and result["block3"].control_train_accuracy < 0.6
    assert result["block0"].flagged and "train-near-control" in result["block0"].flag_reasons


@pytest.mark.parametrize("reg", [1e-2, "auto"])
def test_matches_sklearn_on_same_split_and_reg(tmp_path, reg):
    rng = np.random.default_rng(1)
    n, classes = 500, 4
    y = rng.integers(0, classes, n)
    mix = rng.normal(size=(60, 60))
    acts = {
        "narrow": (rng.normal(size=(n, 5)) + 0.8 * np.eye(classes, 5)[y]).astype(np.float32),
        # correlated, unevenly scaled features: what standardization and rotation must handle
        "wide": ((rng.normal(size=(n, 60)) + 0.3 * np.eye(classes, 60)[y]) @ mix
                 * rng.uniform(0.1, 10, 60) + 5).astype(np.float32),
        "maps": (rng.normal(size=(n, 12, 3, 3))
                 + 0.5 * np.eye(classes, 12)[y][:, :, None, None]).astype(np.float32),
    }
    result = probe(make_store(tmp_path / "s.h5", acts), y, reg=reg, progress=False)
    tr, te = result.train_index, result.test_index
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == n
    for layer, x in acts.items():
        row = result[layer]
        x = x.reshape(n, x.shape[1], -1).mean(-1).astype(np.float64)
        scaler = StandardScaler().fit(x[tr])
        clf = sk_fit(scaler.transform(x[tr]), y[tr], row.reg)
        xte = scaler.transform(x[te])
        assert abs(row.test_accuracy - clf.score(xte, y[te])) <= 0.01, layer
        assert abs(row.train_accuracy - clf.score(scaler.transform(x[tr]), y[tr])) <= 0.01
        assert row.test_loss == pytest.approx(log_loss(y[te], clf.predict_proba(xte)), abs=2e-3)
        assert row.converged and row.n_features == x.shape[1] and row.reduction is None
    if reg == "auto":
        assert all(result[k].reg in ProbeOptions().reg_grid for k in acts)
        assert len(result.val_index) > 0 and np.isin(result.val_index, tr).all()


def test_random_labels_are_at_chance_and_flagged(tmp_path):
    rng = np.random.default_rng(2)
    n, d = 150, 200  # more features than samples: a linear probe memorizes anything
    acts = {"noise": rng.normal(size=(n, d)).astype(np.float32)}
    y = rng.integers(0, 3, n)
    result = probe(make_store(tmp_path / "r.h5", acts), y, reg=1e-4, progress=False)
    row = result["noise"]
    assert row.train_accuracy == 1.0 and row.control_train_accuracy == 1.0
    assert abs(row.test_accuracy - 1 / 3) < 0.2 and abs(row.control_test_accuracy - 1 / 3) < 0.2
    assert abs(row.selectivity) < 0.25
    assert row.flagged and set(row.flag_reasons) == {"train-near-control", "train-test-gap"}
    text = result.summary()
    assert "! train-near-control, train-test-gap" in text and "WARNING" in text
    assert result.flagged == ["noise"]
    # with the regularization chosen on validation data it stays flagged
    auto = probe(result.settings["store"], y, progress=False)
    assert auto["noise"].flagged and abs(auto["noise"].selectivity) < 0.25


def test_streamed_layers_equal_in_memory(tmp_path):
    acts, y = graded(n=300, strengths=(0.5, 2.0))
    rng = np.random.default_rng(3)
    acts["maps"] = (rng.normal(size=(300, 6, 4, 4)) + np.eye(3, 6)[y][:, :, None, None]
                    ).astype(np.float32)
    store = make_store(tmp_path / "m.h5", acts)
    kw = dict(pool="mean", progress=False)
    ref = probe(store, y, **kw)
    tiny = ProbeOptions(memory_budget=1000, read_bytes=2048)  # all layers out of core
    streamed = probe(store, y, options=tiny, **kw)
    for layer in acts:
        a, b = ref[layer], streamed[layer]
        assert a.reg == b.reg and a.test_accuracy == b.test_accuracy
        assert a.train_accuracy == b.train_accuracy
        assert a.control_test_accuracy == b.control_test_accuracy
        assert a.test_loss == pytest.approx(b.test_loss, abs=1e-4)
    flat = probe(store, y, ["maps"], pool=None, options=tiny, reg=0.1, progress=False)
    flat_ref = probe(store, y, ["maps"], pool=None, reg=0.1, progress=False)
    assert flat["maps"].n_features == 96 and flat["maps"].test_loss == pytest.approx(
        flat_ref["maps"].test_loss, abs=1e-4)


def test_layers_probed_together_equal_layers_probed_alone(tmp_path):
    acts, y = graded(n=300)
    store = make_store(tmp_path / "t.h5", acts)
    together = probe(store, y, progress=False)
    for layer in ["block1", "block3"]:
        alone = probe(store, y, layer, progress=False)[layer]
        assert alone.reg == together[layer].reg
        assert alone.test_accuracy == together[layer].test_accuracy
        assert alone.test_loss == pytest.approx(together[layer].test_loss, abs=1e-4)


def test_pca_reduction_matches_sklearn_pipeline(tmp_path):
    rng = np.random.default_rng(4)
    n, classes = 400, 3
    y = rng.integers(0, classes, n)
    latent = rng.normal(size=(n, 6)) + 1.5 * np.eye(classes, 6)[y]
    x = (latent @ rng.normal(size=(6, 64)) * 3 + 0.5 * rng.normal(size=(n, 64))).astype(
        np.float32)
    store = make_store(tmp_path / "p.h5", {"wide": x})
    result = probe(store, y, max_features=8, reg=1e-2, progress=False)
    row = result["wide"]
    assert (row.n_features, row.input_features, row.reduction) == (8, 64, "pca")
    assert 0.5 < row.explained_variance <= 1.0
    tr, te = result.train_index, result.test_index
    scaler = StandardScaler().fit(x[tr].astype(np.float64))
    pca = PCA(8).fit(scaler.transform(x[tr]))
    ztr, zte = pca.transform(scaler.transform(x[tr])), pca.transform(scaler.transform(x[te]))
    clf = sk_fit(ztr, y[tr], 1e-2)
    assert abs(row.test_accuracy - clf.score(zte, y[te])) <= 0.01
    assert row.explained_variance == pytest.approx(pca.explained_variance_ratio_.sum(), abs=1e-4)
    assert "64->8 pca" in result.summary()
    rp = probe(store, y, max_features=8, reg=1e-2, progress=False,
               options=ProbeOptions(reduction="random"))["wide"]
    assert rp.reduction == "random" and rp.n_features == 8 and rp.test_accuracy > 0.6


def test_pooling_modes(tmp_path):
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(200, 4, 3, 5)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    maps[np.arange(200), 0, 1, 2] += 4 * y  # one hot spot: visible to max, diluted by mean
    store = make_store(tmp_path / "p.h5", {"conv": maps})
    rows = {pool: probe(store, y, pool=pool, reg=1e-3, progress=False)["conv"]
            for pool in ("mean", "max", None)}
    assert rows["mean"].n_features == rows["max"].n_features == 4
    assert rows[None].n_features == 60
    assert rows["max"].test_accuracy > 0.9
    assert rows["max"].test_accuracy > rows["mean"].test_accuracy


def test_batched_lbfgs_direction_equals_per_problem_two_loop():
    from dissect.probes._fit import BatchedSoftmax, Block

    torch.manual_seed(0)
    n, classes, n_var, m = 20, 3, 2, 4
    blocks = [Block([0, 2], 5, x=torch.randn(2, n, 5, dtype=torch.float64)),
              Block([1], 9, x=torch.randn(1, n, 9, dtype=torch.float64))]
    model = BatchedSoftmax(blocks, 3, classes, torch.device("cpu"), torch.float64)
    shape = (model.n_rows, n_var, classes)

    def oracle(g, h0, s_hist, y_hist, rho, stored, layer, v):  # textbook, one problem
        rows = model.row_layer == layer
        vec = lambda t: t[rows, v].reshape(-1)  # noqa: E731
        q, alphas = -vec(g), {}
        order = [(stored - 1 - j) % m for j in range(min(stored, m))]
        for k in [k for k in order if rho[k, layer, v] != 0]:
            alphas[k] = rho[k, layer, v] * (vec(s_hist[k]) @ q)
            q = q - alphas[k] * vec(y_hist[k])
        d = vec(h0) * q
        for k in [k for k in reversed(order) if rho[k, layer, v] != 0]:
            beta = rho[k, layer, v] * (vec(y_hist[k]) @ d)
            d = d + (alphas[k] - beta) * vec(s_hist[k])
        return d

    for stored in (1, 3, 6):
        s_hist = torch.randn(m, *shape, dtype=torch.float64)
        y_hist = 2 * s_hist + 0.3 * torch.randn(m, *shape, dtype=torch.float64)
        rho = torch.stack([1 / model.dot(s_hist[k], y_hist[k]) for k in range(m)])
        rho[torch.rand(rho.shape) < 0.25] = 0.0  # some problems skipped some pairs
        rho[min(stored, m):] = 0.0
        g = torch.randn(shape, dtype=torch.float64)
        h0 = torch.rand(shape, dtype=torch.float64) + 0.5
        d = model.direction(g, h0, s_hist, y_hist, rho, stored)
        for layer in range(3):
            for v in range(n_var):
                want = oracle(g, h0, s_hist, y_hist, rho, stored, layer, v)
                got = d[model.row_layer == layer, v].reshape(-1)
                assert torch.allclose(got, want, atol=1e-12), (stored, layer, v)


# --------------------------------------------------------------------------- split and labels


def test_stratified_split_is_deterministic_and_balanced():
    y = np.repeat([0, 1, 2], [100, 60, 40])
    tr, te = stratified_split(y, 0.25, 7)
    tr2, te2 = stratified_split(y, 0.25, 7)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(te, stratified_split(y, 0.25, 8)[1])
    assert len(te) == 50 and np.bincount(y[te]).tolist() == [25, 15, 10]
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(200))
    singleton = np.array([0] * 9 + [1])
    tr, te = stratified_split(singleton, 0.5, 0)
    assert 9 in tr  # a class's only row is never held out


def test_labels_from_dataset_targets(tmp_path, tiny):
    data = SyntheticConcepts(48, size=16, seed=0)
    bare = capture(tiny, data, ["1"], tmp_path / "bare.h5", pool="mean", progress=False)
    with pytest.raises(DataError, match="does not record the dataset"):
        dataset_targets(bare)
    store = capture(tiny, data, ["1", "4"], tmp_path / "c.h5", pool="mean", progress=False,
                    dataset="synthetic:48")
    assert store.meta["dataset"] == "synthetic:48"
    expected = data.targets.numpy()[store.index]
    assert np.array_equal(dataset_targets(store), expected)
    assert np.array_equal(dataset_targets(store, data), expected)
    a = probe(store, "targets", reg=0.1, progress=False)
    b = probe(store, data.targets, reg=0.1, progress=False)
    assert [r.test_accuracy for r in a] == [r.test_accuracy for r in b]
    assert a.classes.tolist() == sorted(set(expected.tolist()))


# --------------------------------------------------------------------------- errors


def test_clear_errors(tmp_path):
    acts, y = graded(n=60)
    store = make_store(tmp_path / "e.h5", acts)
    with pytest.raises(DataError, match="59 labels for 60"):
        probe(store, y[:-1], progress=False)
    with pytest.raises(DataError, match="single class"):
        probe(store, np.zeros(60, dtype=int), progress=False)
    with pytest.raises(DataError, match="integer"):
        probe(store, y + 0.5, progress=False)
    with pytest.raises(LayerNotFoundError, match="block1"):
        probe(store, y, ["blok1"], progress=False)
    for bad in ({"reg": 0.0}, {"reg": "big"}, {"pool": "median"}, {"max_features": 0},
                {"test_size": 1.5}):
        with pytest.raises(DissectError):
            probe(store, y, progress=False, **bad)
    nan = dict(acts)
    nan["block2"] = nan["block2"].copy()
    nan["block2"][7, 3] = np.nan
    with pytest.raises(DataError, match="block2.*NaN"):
        probe(make_store(tmp_path / "n.h5", nan), y, progress=False)


# --------------------------------------------------------------------------- results and CLI


def test_result_files_round_trip(tmp_path):
    acts, y = graded(n=200)
    result = probe(make_store(tmp_path / "f.h5", acts), y, control=True, progress=False)
    back = ProbeResult.from_json(result.to_json(tmp_path / "r.json"))
    assert back.layers == result.layers and all(
        isinstance(r, LayerProbe) for r in back)
    assert [back[k] for k in back.layers] == [result[k] for k in result.layers]
    assert np.array_equal(back.test_index, result.test_index)
    assert back.summary() == result.summary()
    csv_text = result.to_csv(tmp_path / "r.csv").read_text().splitlines()
    assert csv_text[0].startswith("layer,depth,train_accuracy,test_accuracy,test_loss,chance")
    assert len(csv_text) == 5 and csv_text[1].startswith("block0,0,")
    png = result.plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert result.to_csv(folder) == folder / "probes.csv" and (folder / "probes.csv").is_file()
    no_ctrl = probe(result.settings["store"], y, control=False, progress=False)
    row = no_ctrl["block3"]
    assert np.isnan(row.control_test_accuracy) and np.isnan(row.selectivity)
    again = ProbeResult.from_json(no_ctrl.to_json(tmp_path / "n.json"))
    assert np.isnan(again["block3"].selectivity) and "n/a" in again.summary()
    json.loads((tmp_path / "n.json").read_text())  # strict JSON: NaN written as null
    no_ctrl.plot(tmp_path / "n.png")
    with pytest.raises(DissectError, match="not probed"):
        result["nope"]


def test_cli_probe(tmp_path, capsys):
    acts, y = graded(n=200)
    make_store(tmp_path / "acts.h5", acts).close()
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "out"
    code = main(["probe", str(tmp_path / "acts.h5"), "--labels", str(tmp_path / "y.npy"),
                 "--out", str(out), "--layers", "block0,block3", "--seed", "1",
                 "--test-size", "0.3", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "block3" in text and "Linear probes: 2 layers" in text
    assert {p.name for p in out.iterdir()} == {"probes.csv", "probes.json", "probes.png"}
    saved = ProbeResult.from_json(out / "probes.json")
    assert saved.settings["seed"] == 1 and len(saved.test_index) == 60
    assert main(["probe", str(tmp_path / "acts.h5"), "--labels", "missing.npy", "--out",
                 str(out), "--quiet"]) == 1
    assert "missing.npy" in capsys.readouterr().err


def test_cli_probe_targets_of_a_synthetic_capture(tmp_path, capsys, tiny):
    data = SyntheticConcepts(40, size=16, seed=0)
    capture(tiny, data, ["1", "4"], tmp_path / "c.h5", pool="mean", progress=False,
            dataset="synthetic:40").close()
    assert main(["probe", str(tmp_path / "c.h5"), "--labels", "targets", "--out",
                 str(tmp_path / "o"), "--reg", "0.1", "--pool", "max", "--quiet"]) == 0
    saved = ProbeResult.from_json(tmp_path / "o" / "probes.json")
    assert saved.layers == ["1", "4"] and saved.settings["pool"] == "max"
    assert saved.classes.tolist() == sorted(set(data.targets.tolist()))


def test_device_argument_is_honoured(tmp_path, monkeypatch, probe_devices):
    acts, y = graded(n=120, strengths=(3.0,))
    store = make_store(tmp_path / "d.h5", acts)
    with monkeypatch.context() as m:
        # make CUDA the default device, so that a probe ignoring device="cpu" would not run on
        # the CPU (and without CUDA would fail)
        m.setattr(torch.cuda, "is_available", lambda: True)
        result = probe(store, torch.as_tensor(y), device="cpu", reg=1e-2, progress=False)
    assert {what for what, _ in probe_devices} == {"model", "features", "labels", "parameters"}
    assert {d for _, d in probe_devices} == {torch.device("cpu")}
    assert result.settings["device"] == "cpu" and result["block0"].test_accuracy > 0.8
    if not torch.cuda.is_available():  # asking for a device that is not there is an error
        probe_devices.clear()
        with pytest.raises(DissectError, match="CUDA"):
            probe(store, y, device="cuda", reg=1e-2, progress=False)
        assert not probe_devices
