"""Ablation (#23): known answers on a wired model, equality with a loop of full forward passes
with a hook, the fallback paths, errors, the result file, ablate_concept."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import dissect
from dissect import DataError, DissectError, LayerNotFoundError, Trace
from dissect.ablation import AblationResult, ablate, ablate_concept
from dissect.datasets.concepts import Concept
from dissect.netdissect import DissectionResult

W = torch.tensor([2.0, 3.0, 4.0])  # logit_k = W[k] * mean(feature k) + B[k]
B = torch.tensor([0.3, -0.2, 0.1])


class Wired(nn.Module):
    """``feat`` is the identity on 3 channels; class k's logit reads only channel k."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 3, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.feat.bias.zero_()
            self.head.weight.copy_(torch.diag(W))
            self.head.bias.copy_(B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flat(self.pool(self.feat(x))))


def _wired_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = 0.2 + torch.rand(12, 3, 2, 2, generator=g) * 0.1
    y = torch.arange(12) % 3
    x[torch.arange(12), y] += 1.0  # sample i is clearly of class y[i]; without its channel,
    return x, y                    # its class's logit B[y] is below every other logit


def _hand(x: torch.Tensor, t: torch.Tensor, values: torch.Tensor | None, removed: list[int],
          metric: str, classes: list[int]) -> np.ndarray:
    """The metric per class by hand, with the channels ``removed`` set to ``values``."""
    feat = x.double().mean(dim=(2, 3))
    for u in removed:
        feat[:, u] = 0.0 if values is None else float(values[u])
    logits = feat * W.double() + B.double()
    if metric == "logit":
        v = logits[torch.arange(len(t)), t]
    elif metric == "probability":
        v = torch.softmax(logits, dim=1)[torch.arange(len(t)), t]
    else:
        v = (logits.argmax(1) == t).double()
    return np.array([v[t == c].mean().item() if (t == c).any() else math.nan for c in classes])


@pytest.mark.parametrize("metric", ["logit", "probability", "accuracy"])
def test_wired_units_drop_exactly_their_class(metric):
    x, y = _wired_data()
    res = ablate(Wired(), x, "feat", targets=y, metric=metric, batch_size=5, progress=False)
    assert res.units == [0, 1, 2] and res.classes.tolist() == [0, 1, 2]
    assert res.counts.tolist() == [4, 4, 4]
    assert res.settings["engine"] == "prefix" and res.settings["targets"] == "given"
    np.testing.assert_allclose(res.baseline, _hand(x, y, None, [], metric, [0, 1, 2]),
                               rtol=1e-6, atol=1e-7)
    for u in range(3):
        np.testing.assert_allclose(res.ablated[u], _hand(x, y, None, [u], metric, [0, 1, 2]),
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(res.drop, res.baseline[None] - res.ablated)
    if metric == "logit":  # removing unit u only lowers class u's logit, to B[u]
        np.testing.assert_allclose(res.ablated.diagonal(), B.numpy(), rtol=1e-6)
        off = ~np.eye(3, dtype=bool)
        np.testing.assert_allclose(res.drop[off], 0.0, atol=1e-6)
    for u in range(3):
        assert res.top(u, 1) == [u]


def test_accuracy_drop_is_the_share_of_samples_lost():
    x, y = _wired_data()
    res = ablate(Wired(), x, "feat", targets=y, metric="accuracy", progress=False)
    # with channel u gone, class u's logit is B[u]: below the others for every sample
    np.testing.assert_array_equal(res.baseline, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(res.ablated.diagonal(), [0.0, 0.0, 0.0])


def test_mean_mode_uses_each_units_dataset_mean():
    x, y = _wired_data()
    res = ablate(Wired(), x, "feat", targets=y, metric="logit", mode="mean", batch_size=5,
                 progress=False)
    means = x.double().mean(dim=(0, 2, 3))
    np.testing.assert_allclose(res.means, means.numpy(), rtol=1e-12)
    np.testing.assert_allclose(res.ablated.diagonal(), (W.double() * means + B).numpy(),
                               rtol=1e-6)
    for u in range(3):
        np.testing.assert_allclose(res.ablated[u], _hand(x, y, means, [u], "logit", [0, 1, 2]),
                                   rtol=1e-6)


def test_targets_none_groups_samples_by_the_unablated_prediction():
    x, y = _wired_data()
    x[0] = x[1]  # sample 0 now looks like class 1
    res = ablate(Wired(), x, "feat", metric="accuracy", progress=False)
    with torch.no_grad():
        pred = Wired()(x).argmax(1)
    assert res.settings["targets"] == "predicted"
    assert res.counts.tolist() == [int((pred == c).sum()) for c in range(3)] == [3, 5, 4]
    np.testing.assert_array_equal(res.baseline, 1.0)  # by construction
    given = ablate(Wired(), x, "feat", targets=pred, metric="accuracy", progress=False)
    np.testing.assert_array_equal(given.ablated, res.ablated)


def test_keep_removes_every_other_unit_in_one_row():
    x, y = _wired_data()
    res = ablate(Wired(), x, "feat", [1], keep=True, targets=y, metric="logit", progress=False)
    assert res.removal == "keep" and res.units == [1]
    assert res.ablated.shape == (1, 3) and res.drop.shape == (1, 3) and len(res) == 1
    np.testing.assert_allclose(res.ablated[0], _hand(x, y, None, [0, 2], "logit", [0, 1, 2]),
                               rtol=1e-6)
    assert res.top(None, 2) == [2, 0] == res.top(1, 2)  # B[2] + ... drops most
    with pytest.raises(DissectError, match="not one of"):
        res.top(0)
    with pytest.raises(DissectError, match="units="):
        ablate(Wired(), x, "feat", keep=True, progress=False)


def test_classes_without_samples_are_nan_and_noted():
    x, y = _wired_data()
    keep = y < 2
    res = ablate(Wired(), x[keep], "feat", targets=y[keep], classes=[0, 1, 2],
                 metric="logit", progress=False)
    assert res.counts.tolist() == [4, 4, 0]
    assert np.isnan(res.baseline[2]) and np.isnan(res.ablated[:, 2]).all()
    assert not np.isnan(res.ablated[:, :2]).any()
    assert 2 not in res.top(2, 3)
    assert "no samples" in res.summary() and "NaN" in res.summary()
    default = ablate(Wired(), x[keep], "feat", targets=y[keep], progress=False)
    assert default.classes.tolist() == [0, 1]  # default: the classes that have samples


# --------------------------------------------------------------------------- against a loop


def _loop(model: nn.Module, x: torch.Tensor, layer: str, units: list[int], metric: str,
          targets: torch.Tensor | None = None, tokens="auto", batch_size: int | None = None
          ) -> tuple[np.ndarray, ...]:
    """The reference: one full forward pass per unit with a hook that zeroes it."""
    model.eval()
    step = batch_size or len(x)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(x[i:i + step]) for i in range(0, len(x), step)])

    with torch.no_grad():
        base = run(x)
    t = base.argmax(1) if targets is None else targets

    def value(logits: torch.Tensor) -> torch.Tensor:
        if metric == "logit":
            return logits.gather(1, t[:, None])[:, 0]
        if metric == "probability":
            return torch.softmax(logits, 1).gather(1, t[:, None])[:, 0]
        return (logits.argmax(1) == t).float()

    rows = []
    for u in units:
        def zero(name, m, u=u):
            m = m.clone()
            m[:, u] = 0
            return m
        with torch.no_grad(), Trace(model, layer, edit=zero, tokens=tokens):
            rows.append(value(run(x)).double())
    classes = torch.unique(t)

    def per_class(v: torch.Tensor) -> np.ndarray:
        return np.array([v[t == c].mean().item() for c in classes])

    return classes.numpy(), per_class(value(base).double()), np.stack([per_class(r)
                                                                        for r in rows])


def _same(res: AblationResult, ref: tuple[np.ndarray, ...]) -> None:
    classes, base, ablated = ref
    np.testing.assert_array_equal(res.classes, classes)
    np.testing.assert_allclose(res.baseline, base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.ablated, ablated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["logit", "probability", "accuracy"])
@pytest.mark.parametrize("layer", ["0", "3"])  # "0" is followed by an in-place ReLU
def test_tiny_cnn_equals_a_loop_of_full_forwards(tiny, images, metric, layer):
    x = torch.cat([images, images.flip(-1)])
    y = torch.arange(len(x)) % 3
    for targets in (None, y):
        res = ablate(tiny, x, layer, metric=metric, targets=targets, batch_size=7,
                     progress=False)
        assert res.settings["engine"] == "prefix"
        _same(res, _loop(tiny, x, layer, res.units, metric, targets))


@pytest.mark.parametrize("layer", ["layer3", "layer3.0.conv1"])  # the second: inside a block
def test_resnet18_equals_a_loop_of_full_forwards(layer):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    res = ablate(model, x, layer, range(0, 256, 37), metric="logit", batch_size=4,
                 progress=False)
    assert res.settings["engine"] == "prefix" and res.settings["copies_per_pass"] > 1
    _same(res, _loop(model, x, layer, res.units, "logit"))


def test_vit_token_layer_equals_a_loop_of_full_forwards():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=32,
                                               num_classes=5).eval()
    x = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    layer = "encoder.layers.encoder_layer_0"
    res = ablate(vit, x, layer, [0, 5, 15], metric="probability", batch_size=4,
                 progress=False)
    assert res.settings["engine"] == "prefix" and res.settings["layer_shape"] == [16, 4, 4]
    _same(res, _loop(vit, x, layer, res.units, "probability"))


class Sneaky(nn.Module):
    """Reads a prefix output where no torch function mode can see it: the plan's placeholder
    is wrong there, which the check on the first batch must catch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.layer = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.layer(a)
        with torch._C.DisableTorchFunction():
            extra = a.mean(dim=(2, 3))
        return self.head(b.mean(dim=(2, 3)) + extra)


def test_a_plan_that_does_not_reproduce_the_model_falls_back(caplog, images):
    torch.manual_seed(0)
    model = Sneaky().eval()
    with caplog.at_level(logging.WARNING, logger="dissect"):
        res = ablate(model, images, "layer", metric="logit", batch_size=4, progress=False)
    assert res.settings["engine"] == "full" and "differs" in res.settings["fallback"]
    assert "full forward passes" in caplog.text
    _same(res, _loop(model, images, "layer", res.units, "logit"))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(torch.relu(self.conv(x))).mean(dim=(2, 3)))


def test_a_layer_that_runs_twice_is_edited_at_every_call(caplog, images):
    torch.manual_seed(0)
    model = Twice().eval()
    with caplog.at_level(logging.WARNING, logger="dissect"):
        res = ablate(model, images, "conv", metric="logit", progress=False)
    assert res.settings["engine"] == "full" and "2 times" in res.settings["fallback"]
    _same(res, _loop(model, images, "conv", res.units, "logit"))  # Trace edits every call


class Branchy(nn.Module):
    """Runs an extra module before the layer only for inputs with a positive sum."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Conv2d(3, 3, 1)
        self.layer = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.extra(x)
        return self.head(self.layer(x).mean(dim=(2, 3)))


def test_a_batch_with_other_calls_runs_full_forwards(caplog):
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.cat([torch.rand(4, 3, 4, 4), -torch.rand(4, 3, 4, 4)])
    with caplog.at_level(logging.WARNING, logger="dissect"):
        res = ablate(model, x, "layer", metric="logit", batch_size=4, progress=False)
    assert res.settings["engine"] == "prefix" and "other module calls" in caplog.text
    _same(res, _loop(model, x, "layer", res.units, "logit", batch_size=4))


# --------------------------------------------------------------------------- hooks and state


def _clean(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in model.modules())


class Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError("boom")
        return self.head(h.mean(dim=(2, 3)))


def test_no_hook_or_stand_in_outlives_a_run_or_an_error(tiny, images):
    ablate(tiny, images, "3", progress=False)
    assert _clean(tiny)
    model = Fails().eval()
    with pytest.raises(RuntimeError, match="boom"):
        ablate(model, images, "conv", batch_size=4, progress=False)
    assert _clean(model)


def test_the_training_mode_is_restored(tiny, images):
    tiny.train()
    ablate(tiny, images, "3", progress=False)
    assert all(m.training for m in tiny.modules())


# --------------------------------------------------------------------------- errors


def test_bad_arguments_are_refused(tiny, images):
    with pytest.raises(LayerNotFoundError):
        ablate(tiny, images, "nope", progress=False)
    with pytest.raises(DissectError, match="out of range"):
        ablate(tiny, images, "3", [6], progress=False)
    with pytest.raises(DissectError, match="non-negative"):
        ablate(tiny, images, "3", [-1], progress=False)
    with pytest.raises(DissectError, match="more than once"):
        ablate(tiny, images, "3", [1, 1], progress=False)
    with pytest.raises(DissectError, match="metric"):
        ablate(tiny, images, "3", metric="loss", progress=False)
    with pytest.raises(DissectError, match="mode"):
        ablate(tiny, images, "3", mode="noise", progress=False)
    with pytest.raises(DataError, match="9 labels for 10 samples"):
        ablate(tiny, images, "3", targets=[0] * 9, progress=False)
    with pytest.raises(DataError, match="integer"):
        ablate(tiny, images, "3", targets=np.zeros(10), progress=False)
    with pytest.raises(DataError, match="3 outputs"):
        ablate(tiny, images, "3", targets=[3] * 10, progress=False)
    with pytest.raises(DissectError, match="classes"):
        ablate(tiny, images, "3", classes=[0, 0], progress=False)
    with pytest.raises(DissectError, match="3 outputs"):
        ablate(tiny, images, "3", classes=[0, 5], progress=False)
    with pytest.raises(DissectError, match="batch_size"):
        ablate(tiny, images, "3", batch_size=0, progress=False)
    assert _clean(tiny)


def test_a_layer_that_does_not_run_is_an_error():
    x, _ = _wired_data()
    for mode in ("zero", "mean"):
        with pytest.raises(DissectError, match="did not run"):
            ablate(Wired(), x, "unused", mode=mode, progress=False)


def test_an_output_that_is_not_logits_is_an_error(images):
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    with pytest.raises(DissectError, match="logits"):
        ablate(model, images, "0", progress=False)


# --------------------------------------------------------------------------- the result


def _result() -> AblationResult:
    return AblationResult("layer4.1", [3, 0, 7], [1, 5, 9], [2, 0, 4],
                          [0.5, math.nan, 1 / 3], [[0.25, math.nan, 0.1], [0.5, math.nan, 0.0],
                                                   [0.0, math.nan, 1 / 3]],
                          metric="probability", mode="mean", means=np.arange(8) / 7,
                          settings={"n_samples": 6, "targets": "given"})


def test_json_round_trip_is_exact(tmp_path):
    res = _result()
    path = res.to_json(tmp_path / "a" / "r.json")
    back = AblationResult.from_json(path)
    for name in ("baseline", "ablated", "means", "classes", "counts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(res, name))
    assert (back.layer, back.units, back.metric, back.mode, back.removal, back.settings) == (
        res.layer, res.units, res.metric, res.mode, res.removal, res.settings)
    again = back.to_json(tmp_path / "b.json")
    assert again.read_text() == path.read_text()
    folder = tmp_path / "out"
    folder.mkdir()
    assert res.to_json(folder) == folder / "ablation.json"
    assert AblationResult.from_json(folder).units == res.units


def test_top_summary_and_csv(tmp_path):
    res = _result()
    assert res.top(3, 5) == [1, 9]  # drops 0.25 and 0.233; class 5 has no samples
    assert res.top(0, 1) == [9]
    with pytest.raises(DissectError, match="not ablated"):
        res.top(4)
    text = res.summary()
    assert "layer4.1" in text and "unit 7" in text and "1 of 3 classes have no samples" in text
    rows = (tmp_path / "r.csv")
    res.to_csv(rows)
    lines = rows.read_text().splitlines()
    assert lines[0] == "row,units,class,count,baseline,ablated,drop" and len(lines) == 10
    assert lines[2].split(",")[4:] == ["", "", ""]  # NaN: empty cells


def test_damaged_files_are_refused(tmp_path):
    path = _result().to_json(tmp_path / "good.json")
    doc = json.loads(path.read_text())
    for key in ("layer", "units", "classes", "counts", "baseline", "ablated", "metric"):
        bad = {k: v for k, v in doc.items() if k != key}
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DissectError, match="damaged"):
            AblationResult.from_json(tmp_path / "bad.json")
    for key in doc:
        if key in ("format", "version"):
            continue
        for value in (None, 0, "x", [], [1, 2], {}, True, [None]):
            (tmp_path / "bad.json").write_text(json.dumps({**doc, key: value}))
            try:
                AblationResult.from_json(tmp_path / "bad.json")
            except DissectError:
                pass
    (tmp_path / "cut.json").write_text(path.read_text()[:50])
    with pytest.raises(DissectError):
        AblationResult.from_json(tmp_path / "cut.json")


def test_top_level_names():
    assert dissect.ablate is ablate and dissect.ablate_concept is ablate_concept
    assert dissect.AblationResult is AblationResult


# --------------------------------------------------------------------------- concepts


def _dissection() -> DissectionResult:
    concepts = [Concept(1, "red", "color"), Concept(2, "stripes", "texture")]
    iou = {"feat": np.array([[0.3, 0.0], [0.01, 0.2], [0.25, 0.1]])}
    return DissectionResult(["feat"], concepts, ["color", "texture"], iou,
                            {"feat": np.zeros(3, np.float32)},
                            {"feat": np.zeros((3, 2), np.int64)},
                            quantile=0.005, iou_threshold=0.04)


def test_ablate_concept_removes_every_detector_at_once():
    x, y = _wired_data()
    res = ablate_concept(_dissection(), Wired(), x, "red", targets=y, metric="logit",
                         progress=False)
    assert res.removal == "set" and res.units == [0, 2] and res.ablated.shape == (1, 3)
    assert res.settings["concept"] == "red" and "'red' detectors" in res.summary()
    np.testing.assert_allclose(res.ablated[0], _hand(x, y, None, [0, 2], "logit", [0, 1, 2]),
                               rtol=1e-6)
    same = ablate(Wired(), x, "feat", [1], keep=True, targets=y, metric="logit",
                  progress=False)
    np.testing.assert_array_equal(res.ablated, same.ablated)


def test_ablate_concept_errors():
    x, y = _wired_data()
    with pytest.raises(DissectError, match="concepts with detectors: \\['red', 'stripes'\\]"):
        ablate_concept(_dissection(), Wired(), x, "dotted", progress=False)
    with pytest.raises(DissectError, match="was not dissected"):
        ablate_concept(_dissection(), Wired(), x, "red", layer="head", progress=False)
    with pytest.raises(DissectError, match="DissectionResult"):
        ablate_concept({"feat": [0]}, Wired(), x, "red", progress=False)
    two = _dissection()
    two.layers.append("pool")
    two._iou["pool"] = two._iou["feat"]
    two._thresholds["pool"] = two._thresholds["feat"]
    with pytest.raises(DissectError, match="several layers"):
        ablate_concept(two, Wired(), x, "red", progress=False)
    res = ablate_concept(two, Wired(), x, "red", layer="feat", targets=y, progress=False)
    assert res.units == [0, 2]
