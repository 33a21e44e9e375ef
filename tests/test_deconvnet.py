"""Deconvnet / guided backprop reconstructions, receptive fields and top patches: known answers."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import FunctionalNet, ReusedReLU
from torch import nn

from dissect import DissectError, LayerNotFoundError
from dissect.datasets import SyntheticConcepts
from dissect.deconvnet import (
    RectifierRules,
    projection_image,
    receptive_field,
    reconstruct,
    save_patch_grid,
    save_unit_grids,
    top_patches,
)
from dissect.models import Preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- models


class TwoLayer(nn.Module):
    """conv - relu - maxpool - conv - relu, with a choice of how the ReLU is spelled."""

    def __init__(self, relu: str = "module") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=relu == "inplace")
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=relu == "inplace")
        self.out = nn.Identity()
        self.spelling = relu

    def act(self, x: torch.Tensor, n: int) -> torch.Tensor:
        s = self.spelling
        if s in ("module", "inplace"):
            return (self.relu1 if n == 1 else self.relu2)(x)
        if s == "F.relu":
            return F.relu(x)
        if s == "torch.relu":
            return torch.relu(x)
        if s == "Tensor.relu":
            return x.relu()
        if s == "relu_":
            return x.relu_() if n == 1 else torch.relu_(x)
        raise AssertionError(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x), 1))
        return self.out(self.act(self.conv2(x), 2))


def hand(net: TwoLayer, x: torch.Tensor, unit: int, method: str, location="max") -> torch.Tensor:
    """The deconvnet / guided projection by hand: conv_transpose2d, relu, max_unpool2d."""
    with torch.no_grad():
        a1 = net.conv1(x)
        p1, switches = F.max_pool2d(F.relu(a1), 2, return_indices=True)
        a2 = net.conv2(p1)
        r2 = F.relu(a2)
    signal = torch.zeros_like(r2)
    maps = r2[:, unit].reshape(len(x), -1)
    if location == "max":
        rows = torch.arange(len(x))
        at = maps.argmax(1)
        signal[:, unit].view(len(x), -1)[rows, at] = maps[rows, at]
    else:
        signal[:, unit] = r2[:, unit]
    g = signal.clamp(min=0) * ((a2 > 0) if method == "guided" else 1)
    g = F.conv_transpose2d(g, net.conv2.weight, padding=1)
    g = F.max_unpool2d(g, switches, 2, output_size=a1.shape[-2:])
    g = g.clamp(min=0) * ((a1 > 0) if method == "guided" else 1)
    return F.conv_transpose2d(g, net.conv1.weight, padding=1)


def autograd_projection(model: nn.Module, x: torch.Tensor, layer: str, unit: int):
    """The plain gradient of the top signal, with torch.autograd directly."""
    x = x.clone().requires_grad_(True)
    grab = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: grab.__setitem__("out", o))
    try:
        model(x)
    finally:
        handle.remove()
    out = grab["out"]
    maps = out[:, unit].reshape(len(x), -1)
    rows, at = torch.arange(len(x)), maps.detach().argmax(1)
    score = (maps[rows, at] * maps[rows, at].detach()).sum()
    (g,) = torch.autograd.grad(score, x)
    return g


def mode_depth() -> int:
    return torch._C._len_torch_function_stack()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.fixture
def x8() -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
@pytest.mark.parametrize("location", ["max", "all"])
def test_hand_computation(x8, method, location):
    net = TwoLayer().eval()
    ours = reconstruct(net, x8, "relu2", [0, 2, 4], method=method, location=location,
                       progress=False)
    expected = torch.stack([hand(net, x8, u, method, location) for u in [0, 2, 4]], dim=1)
    assert ours.shape == (3, 3, 3, 8, 8)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_rules_differ_from_each_other(x8):
    net = TwoLayer().eval()
    got = {m: reconstruct(net, x8, "relu2", [0, 2, 4], method=m, progress=False)
           for m in ("deconvnet", "guided", "gradient")}
    assert not torch.allclose(got["deconvnet"], got["guided"])
    assert not torch.allclose(got["deconvnet"], got["gradient"])
    assert not torch.allclose(got["guided"], got["gradient"])


def test_gradient_equals_autograd(x8):
    net = TwoLayer().eval()
    ours = reconstruct(net, x8, "relu2", [1, 3], method="gradient", progress=False)
    for k, unit in enumerate([1, 3]):
        torch.testing.assert_close(ours[:, k], autograd_projection(net, x8, "relu2", unit),
                                   rtol=0, atol=1e-7)


@pytest.mark.parametrize("spelling", ["inplace", "F.relu", "torch.relu", "Tensor.relu", "relu_"])
@pytest.mark.parametrize("method", ["deconvnet", "guided", "gradient"])
def test_every_relu_spelling_gives_the_same_result(x8, spelling, method):
    reference = reconstruct(TwoLayer("module").eval(), x8, "out", [0, 3], method=method,
                            progress=False)
    other = reconstruct(TwoLayer(spelling).eval(), x8, "out", [0, 3], method=method,
                        progress=False)
    torch.testing.assert_close(other, reference, rtol=0, atol=0)


def test_reused_relu_module_follows_the_rule_at_each_call():
    torch.manual_seed(0)
    reused = ReusedReLU().eval()

    class TwoReLUs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = reused.conv1, reused.conv2
            self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.relu_b(self.conv2(self.relu_a(self.conv1(x))) - 0.5)

    class Out(nn.Module):  # a named layer after the whole forward pass
        def __init__(self, net):
            super().__init__()
            self.net, self.head = net, nn.Identity()

        def forward(self, x):
            return self.head(self.net(x))

    x = 4 * torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    for method in ("deconvnet", "guided"):
        a = reconstruct(Out(reused).eval(), x, "head", [0, 1, 2, 3], method=method,
                        progress=False)
        b = reconstruct(Out(TwoReLUs()).eval(), x, "head", [0, 1, 2, 3], method=method,
                        progress=False)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.abs().amax(dim=(2, 3, 4)).min() > 0
    g = reconstruct(Out(reused).eval(), x, "head", [0, 1], method="gradient", progress=False)
    assert not torch.allclose(a[:, :2], g)


class SixNet(nn.Module):
    """conv (scaled so many inputs exceed 6) - ReLU6 spelled four ways - conv."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.mul_(8)
        self.act = {"ReLU6": nn.ReLU6(inplace=True), "Hardtanh": nn.Hardtanh(0.0, 6.0)}.get(
            spelling, nn.Identity())
        self.spelling = spelling
        self.out = nn.Identity()

    def forward(self, x):
        a = self.conv1(x)
        if self.spelling == "F.relu6":
            a = F.relu6(a)
        elif self.spelling == "F.hardtanh":
            a = F.hardtanh(a, 0.0, 6.0)
        else:
            a = self.act(a)
        return self.out(self.conv2(a))


@pytest.mark.parametrize("spelling", ["ReLU6", "Hardtanh", "F.relu6", "F.hardtanh"])
def test_relu6_rules(x8, spelling):
    net = SixNet(spelling).eval()
    with torch.no_grad():
        a1 = net.conv1(x8)
        r2 = net.conv2(F.relu6(a1))
    assert (a1 > 6).any() and (a1 < 0).any()
    rows = torch.arange(len(x8))
    for method in ("deconvnet", "guided"):
        ours = reconstruct(net, x8, "out", [2], method=method, progress=False)[:, 0]
        signal = torch.zeros_like(r2)
        maps = r2[:, 2].reshape(len(x8), -1)
        at = maps.argmax(1)
        signal[:, 2].view(len(x8), -1)[rows, at] = maps[rows, at]
        g = F.conv_transpose2d(signal, net.conv2.weight, padding=1).clamp(min=0)
        if method == "guided":  # ReLU6's linear range only
            g = g * ((a1 > 0) & (a1 < 6))
        expected = F.conv_transpose2d(g, net.conv1.weight, padding=1)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_other_activations_keep_their_gradient(x8, caplog):
    """In a network with a rectifier, GELU/SiLU/LeakyReLU keep their gradient (and are named):
    after the last rectifier, the deconvnet signal is the plain gradient's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.LeakyReLU(0.1),
                        nn.Conv2d(4, 4, 3), nn.GELU(), nn.Conv2d(4, 3, 1), nn.SiLU()).eval()
    with caplog.at_level(logging.WARNING, logger="dissect.deconvnet"):
        d = reconstruct(net, x8, "7", [0, 2], method="deconvnet", progress=False)
    assert "gelu" in caplog.text and "leaky_relu" in caplog.text and "silu" in caplog.text
    # the same projection by hand: the gradient down to the ReLU's output, then its rule
    xs = x8.clone().requires_grad_(True)
    a1 = net[1](net[0](xs))
    out = net[2:](a1)
    rows = torch.arange(len(x8))
    signal = torch.zeros_like(out)
    for k, unit in enumerate([0, 2]):
        maps = out[:, unit].detach().reshape(len(x8), -1)
        at = maps.argmax(1)
        signal.zero_()
        signal[:, unit].view(len(x8), -1)[rows, at] = maps[rows, at]
        (g1,) = torch.autograd.grad(out, a1, signal, retain_graph=True)
        (expected,) = torch.autograd.grad(net[0](xs), xs, g1.clamp(min=0))
        torch.testing.assert_close(d[:, k], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_a_network_without_rectifiers_is_refused(x8, method):
    """Deconvnet and guided backprop are defined for ReLU networks: on a GELU/SiLU network
    the rule would apply nowhere, and the plain gradient is not passed off under its name."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 3), nn.GELU(),
                        nn.Conv2d(4, 3, 1), nn.SiLU()).eval()
    with pytest.raises(DissectError, match=r"defined for ReLU networks.*gelu.*method='gradient'"):
        reconstruct(net, x8, "5", [0, 2], method=method, progress=False)
    g = reconstruct(net, x8, "5", [0, 2], method="gradient", progress=False)
    assert g.shape == (len(x8), 2, *x8.shape[1:]) and g.abs().sum() > 0
    # a layer before any activation: the rules have nothing to refuse (the transposed conv)
    first = reconstruct(net, x8, "0", [1], method=method, progress=False)
    torch.testing.assert_close(first, reconstruct(net, x8, "0", [1], method="gradient",
                                                  progress=False), rtol=0, atol=0)


class ResidualBN(nn.Module):
    """Pure nn.ReLU modules, BatchNorm, max-pooling and a residual sum (captum can do it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6),
                                    nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(6, 5, 1)
        for m in self.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.relu(x + self.branch(x)))


class UnitMax(nn.Module):
    """``model`` cut at ``layer`` returning ``v * v.detach()`` with ``v`` a unit's maximum."""

    def __init__(self, model: nn.Module, layer: str, unit: int) -> None:
        super().__init__()
        self.model, self.layer, self.unit = model, layer, unit

    def forward(self, x):
        grab = {}
        handle = self.model.get_submodule(self.layer).register_forward_hook(
            lambda m, i, o: grab.__setitem__("out", o))
        try:
            self.model(x)
        finally:
            handle.remove()
        v = grab["out"][:, self.unit].flatten(1).max(dim=1).values
        return v * v.detach()


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_captum_agrees_on_a_pure_relu_model(method):
    captum = pytest.importorskip("captum.attr")
    model = ResidualBN().eval()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    ours = reconstruct(model, x, "head", [0, 3, 4], method=method, progress=False)
    cls = captum.Deconvolution if method == "deconvnet" else captum.GuidedBackprop
    for k, unit in enumerate([0, 3, 4]):
        with pytest.warns(UserWarning):
            theirs = cls(UnitMax(model, "head", unit)).attribute(x.clone())
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours[:, k], theirs, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- real networks


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2().eval()


@pytest.mark.parametrize("arch, layer", [("resnet18", "layer2"), ("mobilenet", "features.6")])
def test_real_networks(arch, layer, request):
    model = request.getfixturevalue(arch)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    model.train()  # restored afterwards
    got = {m: reconstruct(model, x, layer, [0, 7], method=m, progress=False)
           for m in ("deconvnet", "guided", "gradient")}
    assert model.training and all(m.training for m in model.modules())
    assert got["deconvnet"].shape == (2, 2, 3, 64, 64)
    for m in got.values():
        assert torch.isfinite(m).all() and m.abs().amax(dim=(2, 3, 4)).min() > 0
    assert (got["deconvnet"] - got["gradient"]).abs().max() > 1e-3 * got["gradient"].abs().max()
    assert (got["guided"] - got["gradient"]).abs().max() > 1e-3 * got["gradient"].abs().max()
    # batched units are per-unit calls; input batches are independent
    one = reconstruct(model.eval(), x, layer, [7], progress=False)
    torch.testing.assert_close(got["deconvnet"][:, 1:], one, rtol=1e-5, atol=1e-7)
    chunked = reconstruct(model, x, layer, [0, 7], batch_size=1, progress=False)
    torch.testing.assert_close(chunked, got["deconvnet"], rtol=1e-5, atol=1e-7)


def test_nothing_left_behind_after_an_error(resnet18):
    x = torch.randn(1, 3, 32, 32)
    hooks, depth = hook_count(resnet18), mode_depth()

    def boom(module, inputs, output):
        raise RuntimeError("boom")

    handle = resnet18.layer1.register_forward_hook(boom)  # raises inside the mode
    try:
        with pytest.raises(RuntimeError, match="boom"):
            reconstruct(resnet18, x, "layer2", [0], progress=False)
    finally:
        handle.remove()
    assert hook_count(resnet18) == hooks and mode_depth() == depth
    with pytest.raises(DissectError, match="out of range"):
        reconstruct(resnet18, x, "layer1", [3, 64], progress=False)
    assert hook_count(resnet18) == hooks and mode_depth() == depth
    # outside a call, the model computes ordinary gradients again
    xs = x.clone().requires_grad_(True)
    out = resnet18(xs)
    assert out.grad_fn is not None and "Rectifier" not in repr(out.grad_fn.next_functions)


def test_rectifier_rules_are_scoped_to_the_block():
    torch.manual_seed(0)
    net = FunctionalNet().eval()  # F.relu inside forward, no ReLU module
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    depth = mode_depth()
    with RectifierRules("deconvnet") as mode:
        assert mode_depth() == depth + 1
        y = net(x)
    assert mode.rerouted == 1 and mode_depth() == depth
    (ours,) = torch.autograd.grad(y[:, 0].sum(), x)
    (plain,) = torch.autograd.grad(net(x)[:, 0].sum(), x)
    assert not torch.allclose(ours, plain)
    with pytest.raises(ValueError):
        RectifierRules("lrp")


def test_argument_errors(x8):
    net = TwoLayer().eval()
    with pytest.raises(DissectError, match="unknown method"):
        reconstruct(net, x8, "relu2", [0], method="lrp")
    with pytest.raises(LayerNotFoundError, match="relu2"):
        reconstruct(net, x8, "relu3", [0])
    with pytest.raises(DissectError, match="out of range"):
        reconstruct(net, x8, "relu2", [5], progress=False)
    with pytest.raises(DissectError, match="outside"):
        reconstruct(net, x8, "relu2", [0], location=(4, 0), progress=False)
    with pytest.raises(DissectError, match="non-negative"):
        reconstruct(net, x8, "relu2", [-1])
    with pytest.raises(DissectError, match="batch"):
        reconstruct(net, x8[0, 0, 0], "relu2", [0])
    with pytest.raises(DissectError, match="one layer"):
        reconstruct(net, x8, ["relu1", "relu2"], [0])


def test_position_location_is_the_max_location(x8):
    net = TwoLayer().eval()
    with torch.no_grad():
        r2 = net(x8)
    i, j = divmod(int(r2[0, 1].argmax()), r2.shape[-1])
    at = reconstruct(net, x8[:1], "relu2", [1], location=(i, j), progress=False)
    top = reconstruct(net, x8[:1], "relu2", [1], location="max", progress=False)
    torch.testing.assert_close(at, top, rtol=0, atol=0)


# --------------------------------------------------------------------------- receptive fields


def test_receptive_field_of_a_known_net():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)).eval()
    field = receptive_field(net, "4", 16)
    assert (field.size, field.stride, field.offset, field.map_size) == (
        (6, 6), (2, 2), (-2, -2), (8, 8))
    assert field.box(0, 0) == (0, 4, 0, 4)
    assert field.box(3, 5) == (4, 10, 8, 14)
    assert field.box(7, 7, clip=False) == (12, 18, 12, 18) and field.box(7, 7) == (12, 16, 12, 16)
    assert field.window(0, 7) == (0, 6, 10, 16)
    assert field.crop(3, 5) == (4, 10, 8, 14)
    assert receptive_field(net, "0", (3, 9, 7)).size == (3, 3)


def test_receptive_field_of_real_networks(resnet18, mobilenet):
    assert receptive_field(resnet18, "layer1", 64).size == (43, 43)
    r2 = receptive_field(resnet18, "layer2", 96)  # a field larger than the input: probes grow
    assert (r2.size, r2.stride, r2.offset) == ((99, 99), (8, 8), (-49, -49))
    m = receptive_field(mobilenet, "features.4", 64)
    assert (m.size, m.stride) == ((27, 27), (8, 8))
    assert receptive_field(resnet18, "avgpool", 64).is_global
    assert receptive_field(resnet18, "fc", 64).is_global


def test_projection_lies_inside_the_receptive_field(resnet18):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    field = receptive_field(resnet18, "layer1", 64)
    with torch.no_grad():
        maps = resnet18.layer1(resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x)))))
    active = (maps[0, 3] > 0).nonzero().tolist()
    corner = min(active, key=lambda p: p[0] + p[1])
    for i, j in [corner, active[len(active) // 2], active[-1]]:
        g = reconstruct(resnet18, x, "layer1", [3], method="gradient", location=(i, j),
                        progress=False)[0, 0].abs().sum(0)
        y0, y1, x0, x1 = field.box(i, j)
        inside = g[y0:y1, x0:x1].sum()
        assert inside > 0 and torch.isclose(inside, g.sum())


# --------------------------------------------------------------------------- top patches


@pytest.fixture(scope="module")
def synthetic() -> SyntheticConcepts:
    return SyntheticConcepts(10, size=48, transform=Preprocess(resize_size=None, crop_size=None))


def test_top_patches_are_exact(resnet18, synthetic):
    units = [0, 5, 9]
    top = top_patches(resnet18, synthetic, "layer1", units, k=4, batch_size=4, progress=False)
    full = top_patches(resnet18, synthetic, "layer1", units, k=4, crop=False, progress=False)
    assert top.images.shape == top.projections.shape == (3, 4, 3, 43, 43)
    torch.testing.assert_close(top.projections, full.projections, rtol=1e-4, atol=1e-6)
    x = torch.stack([synthetic[i]["image"] for i in range(len(synthetic))])
    with torch.no_grad():
        maps = resnet18.layer1(resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x)))))
    maxima = maps.amax(dim=(2, 3))
    for n, unit in enumerate(units):
        patches = top[unit]
        assert [p.row for p in patches] == maxima[:, unit].argsort(descending=True)[:4].tolist()
        for p in patches:
            assert p.value == pytest.approx(float(maxima[p.row, unit]), rel=1e-5)
            proj = reconstruct(resnet18, x[p.row:p.row + 1], "layer1", [unit],
                               progress=False)[0, 0]
            y0, y1, x0, x1 = p.window
            torch.testing.assert_close(top.projections[n, p.rank], proj[:, y0:y1, x0:x1],
                                       rtol=1e-4, atol=1e-6)
            outside = proj.clone()
            outside[:, y0:y1, x0:x1] = 0
            assert outside.abs().max() == 0
            torch.testing.assert_close(top.images[n, p.rank], x[p.row, :, y0:y1, x0:x1])
    assert "layer1" in top.summary() and len(top.rows()) == 12


def test_top_patches_from_a_store(tmp_path, mobilenet, synthetic):
    from dissect import capture

    store = capture(mobilenet, synthetic, ["features.4"], tmp_path / "a.h5", pool="max",
                    dtype="float32", progress=False)
    with store:
        a = top_patches(mobilenet, synthetic, "features.4", [1, 2], k=3, store=store,
                        method="guided", progress=False)
    b = top_patches(mobilenet, synthetic, "features.4", [1, 2], k=3, method="guided",
                    progress=False)
    assert [p.row for p in a.rows()] == [p.row for p in b.rows()]
    torch.testing.assert_close(a.projections, b.projections, rtol=1e-4, atol=1e-7)
    assert a.projections.shape[-2:] == (27, 27)
    other = torchvision.models.mobilenet_v2().eval()
    with ActivationStoreFor(tmp_path / "a.h5") as s, pytest.raises(DissectError, match="another"):
        top_patches(other, synthetic, "features.4", [1], store=s, progress=False)


def ActivationStoreFor(path):  # noqa: N802 - reads like the class it returns
    from dissect import ActivationStore

    return ActivationStore(path)


class CoordNet(nn.Module):
    """Not translation-covariant: adds the absolute row coordinate (crops must be redone)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        rows = torch.linspace(0, 1, x.shape[2], device=x.device).view(1, 1, -1, 1)
        return self.act(self.conv(x) + rows)


def test_crops_that_misfit_are_redone_on_the_whole_image(synthetic, caplog):
    with caplog.at_level(logging.WARNING, logger="dissect.deconvnet"):
        a = top_patches(CoordNet(), synthetic, "act", [0, 1, 2], k=3, progress=False)
    b = top_patches(CoordNet(), synthetic, "act", [0, 1, 2], k=3, crop=False, progress=False)
    assert "recomputing" in caplog.text
    torch.testing.assert_close(a.projections, b.projections, rtol=0, atol=0)


def test_top_patches_outputs(tmp_path, synthetic):
    net = TwoLayer().eval()
    top = top_patches(net, synthetic, "relu2", [0, 1, 2], k=20, progress=False)
    assert top.k == len(synthetic)  # k is capped by the dataset
    grid = save_patch_grid(top, tmp_path / "grid.png", tile=16, columns=2)
    image = cv2.imread(str(grid))
    assert image is not None and image.shape[0] > 2 * 16 and image.shape[2] == 3
    files = save_unit_grids(top, tmp_path / "units", tile=16)
    assert sorted(files) == [0, 1, 2]
    assert files[2] == tmp_path / "units" / "relu2" / "unit_0002.png"
    assert all(cv2.imread(str(f)) is not None for f in files.values())
    # default tiles: the 8 px patches enlarged 6x to 48 px; 10 patches in 3 rows of 4
    default = save_unit_grids(top, tmp_path / "native")
    assert cv2.imread(str(default[0])).shape[:2] == (3 * 48 + 2 * 2, 2 * (4 * 48 + 3 * 2) + 6)
    rows = top.to_csv(tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * top.k and rows[0].startswith("layer,unit,rank")
    assert '"receptive_field"' in top.to_json(tmp_path / "p.json").read_text()
    gray = projection_image(torch.zeros(3, 4, 4))
    assert gray.dtype == np.uint8 and (gray == 128).all()
    with pytest.raises(DissectError, match="not computed"):
        top[7]


def test_top_patches_of_a_layer_without_maps(tiny, synthetic):
    top = top_patches(tiny, synthetic, "7", [0, 2], k=2, progress=False)  # the Linear head
    assert top.field.is_global and top.patches[0][0].position == ()
    assert top.patches[0][0].window == (0, 48, 0, 48)
    for n, unit in enumerate([0, 2]):
        for p in top[unit]:
            x = synthetic[p.row]["image"][None]
            full = reconstruct(tiny, x, "7", [unit], progress=False)[0, 0]
            torch.testing.assert_close(top.projections[n, p.rank], full, rtol=1e-5, atol=1e-7)


def test_cli_deconv(tmp_path, capsys):
    from dissect.cli import main

    out = tmp_path / "zf"
    code = main(["deconv", "torchvision:resnet18", "--layer", "layer1", "--units", "0-3",
                 "--data", "synthetic:8", "--out", str(out), "--k", "4", "--batch-size", "8",
                 "--device", "cpu", "--quiet"])
    assert code == 0
    assert "layer1" in capsys.readouterr().out
    grid = cv2.imread(str(out / "layer1_deconvnet_grid.png"))
    assert grid is not None and grid.ndim == 3
    units = sorted((out / "layer1").glob("unit_*.png"))
    assert [u.name for u in units] == [f"unit_{k:04d}.png" for k in range(4)]
    assert all(cv2.imread(str(u)) is not None for u in units)
    assert (out / "layer1_deconvnet_patches.csv").is_file()


def test_cli_deconv_errors_are_one_line(tmp_path, capsys):
    from dissect.cli import main

    code = main(["deconv", "torchvision:resnet18", "--layer", "layer1", "--units", "70",
                 "--data", "synthetic:2", "--out", str(tmp_path), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "out of range" in err[0]
