"""Probes of transformer layers (#24): ``pool="cls"`` reads the class token the store keeps,
``pool="mean"`` the mean over the patch tokens; known answers and exact equalities."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import hooked, tiny_vit

from dissect import DissectError
from dissect.hooks import TokenGrid, capture
from dissect.probes import probe
from dissect.store import ActivationStore, StoreWriter, create_store

pytest.importorskip("sklearn")

BLOCK = "encoder.layers.encoder_layer_0"


def token_store(path, maps: np.ndarray, prefix: np.ndarray | None, grid: TokenGrid,
                name: str = "blk") -> ActivationStore:
    """A complete store of one layer read from tokens, as capture writes it: its patch-token
    maps ``(N, C, h, w)``, its layout and its prefix tokens ``(N, P, C)``."""
    n = len(maps)
    create_store(path, n=n, layers={name: maps.shape[1:]}, dtype="float32", pool=None,
                 attrs={}, tokens={name: grid.to_json()},
                 prefix={} if prefix is None else {name: prefix.shape[1:]})
    with StoreWriter(path) as w:
        w.write(0, np.arange(n), {name: maps}, {name: maps.max(axis=(2, 3))}, None,
                prefix={} if prefix is None else {name: prefix})
        w.finish()
    return ActivationStore(path)


def plain_store(path, features: np.ndarray, name: str = "cls") -> ActivationStore:
    """A complete store of one ``(N, C)`` layer."""
    n = len(features)
    create_store(path, n=n, layers={name: features.shape[1:]}, dtype="float32", pool=None,
                 attrs={})
    with StoreWriter(path) as w:
        w.write(0, np.arange(n), {name: features}, {name: features})
        w.finish()
    return ActivationStore(path)


def same_fit(a, b) -> None:
    """Two probe rows that saw the same features: every number equal (the layer name aside)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    da.pop("layer"), db.pop("layer")
    assert da == db


def planted(n: int = 300, c: int = 8, classes: int = 3, seed: int = 0):
    """The class token carries the label; the 2 x 3 patch tokens are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    cls = rng.normal(size=(n, 1, c)).astype(np.float32)
    cls[:, 0, :classes] += 4.0 * np.eye(classes, dtype=np.float32)[y]
    maps = rng.normal(size=(n, c, 2, 3)).astype(np.float32)
    return maps, cls, y


def test_cls_reads_the_class_token_that_carries_the_label(tmp_path):
    maps, cls, y = planted()
    store = token_store(tmp_path / "t.h5", maps, cls, TokenGrid(prefix=1, grid=(2, 3)))
    by_cls = probe(store, y, pool="cls", reg=1e-2, progress=False)["blk"]
    by_mean = probe(store, y, pool="mean", reg=1e-2, progress=False)["blk"]
    assert by_cls.test_accuracy > 0.95 and by_cls.n_features == 8
    assert by_mean.test_accuracy < 0.55  # the patch tokens know nothing: chance is 1/3
    # the features are exactly the class tokens: the same probe as on them stored plainly
    same_fit(by_cls, probe(plain_store(tmp_path / "c.h5", cls[:, 0]), y, reg=1e-2,
                           progress=False)["cls"])
    assert probe(store, y, pool="cls", reg=1e-2, progress=False).settings["pool"] == "cls"


def test_cls_is_the_first_prefix_token(tmp_path):
    maps, cls, y = planted(seed=1)
    noise = np.random.default_rng(9).normal(size=cls.shape).astype(np.float32)
    prefix = np.concatenate([cls, noise, noise], 1)  # class token, then 2 register tokens
    store = token_store(tmp_path / "r.h5", maps, prefix, TokenGrid(prefix=3, grid=(2, 3)))
    same_fit(probe(store, y, pool="cls", reg=1e-2, progress=False)["blk"],
             probe(plain_store(tmp_path / "c.h5", cls[:, 0]), y, reg=1e-2,
                   progress=False)["cls"])


def test_cls_without_a_class_token_is_a_clear_error(tmp_path):
    maps, _, y = planted(n=60)
    plain = plain_store(tmp_path / "p.h5", maps.mean(axis=(2, 3)))
    with pytest.raises(DissectError, match="'cls' reads the class token.*not read from token "
                                           "outputs.*pool='mean'"):
        probe(plain, y, pool="cls", progress=False)
    nhwc = token_store(tmp_path / "s.h5", maps, None, TokenGrid.nhwc())
    with pytest.raises(DissectError, match="without prefix tokens"):
        probe(nhwc, y, pool="cls", progress=False)
    with pytest.raises(DissectError, match="'cls'"):
        probe(plain, y, pool="token", progress=False)


def test_a_captured_vit_probes_its_hooked_class_token(tmp_path):
    vit = tiny_vit()
    x = torch.randn(60, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    tokens = hooked(vit, BLOCK, x).numpy()
    y = (tokens[:, 0, 0] > np.median(tokens[:, 0, 0])).astype(np.int64)  # a class-token label
    with capture(vit, x, [BLOCK, "conv_proj"], tmp_path / "v.h5", batch_size=16,
                 dtype="float32", progress=False) as store:
        result = probe(store, y, [BLOCK], pool="cls", reg=1e-2, progress=False)
        same_fit(result[BLOCK], probe(plain_store(tmp_path / "c.h5", tokens[:, 0]), y,
                                      reg=1e-2, progress=False)["cls"])
        assert result[BLOCK].test_accuracy > 0.8
        # mean pooling of a token layer: the mean over its patch tokens, class token left out
        mean = probe(store, y, [BLOCK], pool="mean", reg=1e-2, progress=False)[BLOCK]
        ref = probe(plain_store(tmp_path / "m.h5", tokens[:, 1:].mean(1)), y, reg=1e-2,
                    progress=False)["cls"]
        assert (mean.train_accuracy, mean.test_accuracy) == (ref.train_accuracy,
                                                            ref.test_accuracy)
        assert mean.test_loss == pytest.approx(ref.test_loss, rel=1e-4)
        with pytest.raises(DissectError, match="'conv_proj'.*not read from token outputs"):
            probe(store, y, pool="cls", progress=False)  # every layer, conv_proj included
