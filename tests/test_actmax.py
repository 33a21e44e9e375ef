"""Activation maximization and inversion: known answers on units wired by hand."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dissect import DissectError, LayerNotFoundError
from dissect.actmax import (
    L1,
    L2,
    Blur,
    Jitter,
    Pad,
    RandomRotate,
    RandomScale,
    TotalVariation,
    channel,
    direction,
    evaluate,
    invert,
    logit,
    neuron,
    representation_distance,
    rotate,
    save_grid,
    save_unit_images,
    scale,
    standard_transforms,
    visualize,
)
from dissect.actmax.fastcopy import fast_copy
from dissect.cli import main
from dissect.hooks import Trace
from dissect.models import Preprocess

FAST = {"size": 32, "steps": 48, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def color_units() -> nn.Module:
    """Unit 0 of layer "1" detects red, unit 1 blue (1x1 convolutions, then ReLU)."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 0, 0] = torch.tensor([1.0, -0.5, -0.5])
        conv.weight[1, :, 0, 0] = torch.tensor([-0.5, -0.5, 1.0])
    return nn.Sequential(conv, nn.ReLU()).eval()


def gabor(theta_deg: float, k: int = 9, period: float = 4.0, sigma: float = 2.5) -> torch.Tensor:
    """Zero-mean Gabor filter whose wave vector points at ``theta_deg`` (x right, y up)."""
    r = torch.arange(k, dtype=torch.float32) - k // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    th = math.radians(theta_deg)
    u = x * math.cos(th) - y * math.sin(th)  # rows grow downwards: "up" is -y
    g = torch.exp(-(x**2 + y**2) / (2 * sigma**2)) * torch.cos(2 * math.pi * u / period)
    return g - g.mean()


def grating_unit(theta_deg: float) -> nn.Module:
    conv = nn.Conv2d(3, 1, 9, bias=False)
    with torch.no_grad():
        conv.weight[:] = gabor(theta_deg).expand(1, 3, 9, 9) / 3
    return nn.Sequential(conv, nn.ReLU()).eval()


def dominant_orientation(image: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Orientation (degrees, mod 180) of the spectrum's energy away from DC, with the power
    spectrum and the angle of each frequency."""
    g = image.mean(0)
    g = g - g.mean()
    h, w = g.shape
    window = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)
    power = torch.fft.fftshift(torch.fft.fft2(g * window).abs() ** 2)
    fy = -(torch.arange(h) - h // 2)[:, None].float().expand(h, w)
    fx = (torch.arange(w) - w // 2)[None, :].float().expand(h, w)
    power[(fx**2 + fy**2).sqrt() < 0.1 * h] = 0  # drop DC and the lowest frequencies
    phi = torch.atan2(fy, fx)
    a = 0.5 * torch.atan2((power * torch.sin(2 * phi)).sum(), (power * torch.cos(2 * phi)).sum())
    return math.degrees(float(a)) % 180, power, torch.rad2deg(phi) % 180


def angle_gap(a: float, b: float) -> float:
    d = abs(a - b) % 180
    return min(d, 180 - d)


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("param", ["pixel", "fft"])
def test_red_unit_gives_red_image(param):
    model = color_units()
    images = visualize(model, [("1", 0), ("1", 1)], param=param, size=32, steps=128,
                       progress=False)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    r, g, b = images[0].mean((1, 2)).tolist()
    assert r > g + 0.15 and r > b + 0.15, (r, g, b)
    r, g, b = images[1].mean((1, 2)).tolist()  # and the blue unit is blue
    assert b > r + 0.15 and b > g + 0.15, (r, g, b)


@pytest.mark.parametrize(("theta", "param"), [(30, "fft"), (120, "fft"), (75, "pixel")])
def test_grating_unit_spectrum_peaks_at_its_orientation(theta, param):
    images = visualize(grating_unit(theta), ("1", 0), size=48, steps=48, param=param,
                       progress=False)
    angle, power, phi = dominant_orientation(images[0])
    assert angle_gap(angle, theta) < 10, angle
    near = power[torch.tensor([[angle_gap(float(p), theta) < 20 for p in row] for row in phi])]
    ortho = power[torch.tensor([[angle_gap(float(p), theta + 90) < 20 for p in row]
                                for row in phi])]
    assert near.sum() > 5 * ortho.sum()


def _features(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), Trace(model, layer) as tr:
        model(x)
    return tr.outputs[layer]


@pytest.mark.parametrize("param", ["pixel", "fft"])
def test_inversion_reduces_representation_distance(tiny, param):
    g = torch.Generator().manual_seed(3)
    x = nn.functional.avg_pool2d(torch.rand(2, 3, 24, 24, generator=g), 3, 1, 1)
    start = invert(tiny, x, "3", steps=0, param=param, progress=False)
    recon = invert(tiny, x, "3", steps=120, param=param, tv_weight=0.05, progress=False)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    target = _features(tiny, "3", x)
    before = representation_distance(target, _features(tiny, "3", start))
    after = representation_distance(target, _features(tiny, "3", recon))
    assert (after <= 0.1 * before).all(), (before, after)
    one = invert(tiny, x[0], "3", steps=2, progress=False)  # a single (3, H, W) image
    assert one.shape == (3, 24, 24)


# --------------------------------------------------------------------------- determinism


def test_objective_in_a_batch_equals_it_alone(tiny):
    objectives = [("3", 0), channel("4", 5) - 0.5 * channel("4", 1), neuron("3", 2), logit(1)]
    batched = visualize(tiny, objectives, **FAST)
    chunked = visualize(tiny, objectives, batch_size=3, **FAST)
    torch.testing.assert_close(chunked, batched, atol=1e-5, rtol=0)
    values = evaluate(tiny, objectives, batched)
    for k, obj in enumerate(objectives):
        alone = visualize(tiny, obj, **FAST)
        # the same noise, draws and arithmetic: equal up to the rounding of batched kernels
        torch.testing.assert_close(alone[0], batched[k], atol=1e-4, rtol=0)
        value = evaluate(tiny, obj, alone)[0]
        assert abs(float(value - values[k])) <= 0.05 * abs(float(values[k])) + 1e-6


def test_same_seed_same_images_other_seed_other_images(tiny):
    a = visualize(tiny, [("3", 0), ("3", 1)], seed=7, **FAST)
    b = visualize(tiny, [("3", 0), ("3", 1)], seed=7, **FAST)
    c = visualize(tiny, [("3", 0), ("3", 1)], seed=8, **FAST)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (a[0] - a[1]).abs().max() > 1e-3  # different units, different images


def test_optimization_increases_the_objective(tiny):
    objectives = [("0", u) for u in range(4)]
    start = evaluate(tiny, objectives, visualize(tiny, objectives, size=32, steps=0,
                                                 progress=False))
    end = evaluate(tiny, objectives, visualize(tiny, objectives, **FAST))
    assert (end > start + 0.02).all(), (start, end)


# --------------------------------------------------------------------------- objectives


def test_objective_algebra():
    g = torch.Generator().manual_seed(0)
    acts = {"a": torch.randn(2, 4, 5, 6, generator=g), "": torch.randn(2, 10, generator=g)}
    a = acts["a"]
    c1, c2 = channel("a", 1), channel("a", 2)
    torch.testing.assert_close(c1(acts), a[:, 1].mean((1, 2)))
    torch.testing.assert_close(neuron("a", 3)(acts), a[:, 3, 2, 3])
    torch.testing.assert_close(neuron("a", 3, 1, 4)(acts), a[:, 3, 1, 4])
    torch.testing.assert_close(logit(7)(acts), acts[""][:, 7])
    torch.testing.assert_close(direction("a", torch.eye(4)[2])(acts), c2(acts))
    v = torch.tensor([0.5, -1.0, 2.0, 0.0])
    expected = (a * v.view(1, 4, 1, 1)).sum(1).mean((1, 2))
    torch.testing.assert_close(direction("a", v)(acts), expected)

    combo = c1 + 2 * c2 - logit(3) * 0.5
    torch.testing.assert_close(combo(acts), c1(acts) + 2 * c2(acts) - 0.5 * acts[""][:, 3])
    torch.testing.assert_close((-c1)(acts), -c1(acts))
    torch.testing.assert_close((c1 - c2)(acts), c1(acts) - c2(acts))
    torch.testing.assert_close((c1 / 4)(acts), c1(acts) / 4)
    torch.testing.assert_close((1 - c1)(acts), 1 - c1(acts))
    torch.testing.assert_close((("a", 2) + c1)(acts), c2(acts) + c1(acts))
    torch.testing.assert_close(sum([c1, c2, ("a", 0)])(acts), (c1 + c2 + channel("a", 0))(acts))
    assert set(combo.layers) == {"a", ""} and combo.needs_output and not c1.needs_output
    with pytest.raises(TypeError):
        c1 * c2
    with pytest.raises(DissectError, match="4 channels"):
        channel("a", 4)(acts)
    with pytest.raises(DissectError, match="non-negative"):
        channel("a", -1)


def test_unit_out_of_range_and_unknown_layer_fail_early(tiny):
    with pytest.raises(DissectError, match=r"unit 9 is out of range for layer '3'.*6 channels"):
        visualize(tiny, ("3", 9), **FAST)
    with pytest.raises(LayerNotFoundError, match="features"):
        visualize(tiny, ("features.3", 0), **FAST)
    with pytest.raises(DissectError, match="parametrization|param"):
        visualize(tiny, ("3", 0), param="wavelet", **FAST)
    with pytest.raises(DissectError, match="transforms"):
        visualize(tiny, ("3", 0), transforms="fancy", **FAST)
    with pytest.raises(DissectError, match="objective"):
        visualize(tiny, [3], **FAST)
    with pytest.raises(DissectError, match="not both"):
        visualize(tiny, ("3", 0), normalize=Preprocess(), transform=Preprocess(), **FAST)


class Bomb(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the forward pass should have stopped before this layer")


def test_early_stop_hooks_removed_modes_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Bomb()).train()
    images = visualize(model, ("1", 2), **FAST)  # never reaches Bomb
    assert images.shape == (1, 3, 32, 32)
    assert _hooks(model) == 0 and all(m.training for m in model.modules())
    with pytest.raises(AssertionError, match="stopped"):  # logits need the whole pass
        visualize(model, logit(0), **FAST)
    assert _hooks(model) == 0


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()),
    )
    for bn in (net[0][1], net[1][1]):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net.train()


def test_fast_copy_folds_batchnorm_exactly_and_leaves_the_model_alone():
    net = conv_bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = fast_copy(net, torch.device("cpu"), keep=["1.0"])
    assert isinstance(fast[0][1], nn.Identity) and isinstance(fast[1][1], nn.BatchNorm2d)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    layers = ["0.1", "1.0", "1.2"]
    net.eval()
    with torch.no_grad(), Trace(net, layers) as ref, Trace(fast, layers) as got:
        net(x)
        fast(x)
    for name in layers:
        torch.testing.assert_close(got.outputs[name], ref.outputs[name], atol=1e-5, rtol=1e-5)
    net.train()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    images = visualize(net, [("0.1", 0), ("1.2", 3)], **FAST)  # through the folded copy
    assert images.shape == (2, 3, 32, 32) and net.training and _hooks(net) == 0


def test_normalize_takes_a_preprocess_or_a_callable(tiny):
    pre = Preprocess(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    manual = torch.stack([tiny(pre.normalize(x))[i, i] for i in range(2)]).detach()
    for kwargs in ({"normalize": pre}, {"normalize": pre.normalize}):
        torch.testing.assert_close(evaluate(tiny, [logit(0), logit(1)], x, **kwargs), manual)
    a = visualize(tiny, ("3", 0), normalize=pre, **FAST)
    b = visualize(tiny, ("3", 0), normalize=pre.normalize, **FAST)
    assert torch.equal(a, b) and not torch.equal(a, visualize(tiny, ("3", 0), **FAST))


def test_old_argument_names_still_work_for_one_release_with_a_warning(tiny):
    """``batch=`` and ``transform=`` were renamed ``batch_size=`` and ``normalize=``."""
    pre = Preprocess(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    new = visualize(tiny, [("3", 0), ("3", 1)], batch_size=1, normalize=pre, **FAST)
    with pytest.warns(DeprecationWarning, match=r"visualize\(batch=.*use batch_size="):
        old = visualize(tiny, [("3", 0), ("3", 1)], batch=1, normalize=pre, **FAST)
    torch.testing.assert_close(old, new)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match=r"evaluate\(transform=.*use normalize="):
        old = evaluate(tiny, [logit(0), logit(1)], x, transform=pre)
    torch.testing.assert_close(old, evaluate(tiny, [logit(0), logit(1)], x, normalize=pre))


# --------------------------------------------------------------------------- transforms


def test_rotate_turns_counterclockwise_about_the_centre():
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 16] = 1.0  # a dot 6 px right of the centre
    up = rotate(x, 90.0)
    assert up.shape == x.shape
    assert float(up[0, 0, 4, 10]) == pytest.approx(1.0, abs=1e-5)  # now 6 px above
    left = rotate(x, 180.0)[0, 0]
    assert float(left[10, 4]) == pytest.approx(1.0, abs=1e-5)
    small = rotate(x, 10.0)[0, 0]  # 10 degrees: the dot's centre of mass moves on the circle
    ys, xs = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    cy, cx = float((small * ys).sum() / small.sum()), float((small * xs).sum() / small.sum())
    assert cx - 10 == pytest.approx(6 * math.cos(math.radians(10)), abs=0.1)
    assert 10 - cy == pytest.approx(6 * math.sin(math.radians(10)), abs=0.1)
    assert rotate(x, 0.0) is x
    filled = rotate(torch.zeros(1, 3, 8, 8), 45.0, fill=0.5)
    assert float(filled[0, 0, 0, 0]) == pytest.approx(0.5)  # corners come from outside


def test_scale_resizes_about_the_same_content():
    x = torch.zeros(1, 1, 20, 20)
    x[..., 10:] = 1.0  # left half dark, right half bright
    big = scale(x, 1.5)
    assert big.shape[-2:] == (30, 30)
    assert float(big[0, 0, 0, 14]) < 0.5 < float(big[0, 0, 0, 15])  # the edge stays central
    assert scale(x, 0.5).shape[-2:] == (10, 10) and scale(x, 1.0) is x
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scale(image, 0.9).mean(), image.mean(), atol=0.02, rtol=0)


def test_pad_jitter_and_random_draws():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    padded = Pad(12)(x)
    assert padded.shape[-2:] == (56, 56) and float(padded[0, 0, 0, 0]) == 0.5
    assert Jitter(8)(x, g).shape[-2:] == (24, 24)
    dy, dx = Jitter(8).sample(g)
    assert 0 <= dy <= 8 and 0 <= dx <= 8
    assert torch.equal(Jitter(8).apply(x, (dy, dx)), x[..., dy:dy + 24, dx:dx + 24])
    scales = {RandomScale().sample(g) for _ in range(300)}
    assert min(scales) == pytest.approx(0.9) and max(scales) == pytest.approx(1.1)
    assert len(scales) == 11
    angles = [RandomRotate().sample(g) for _ in range(300)]
    assert set(angles) == set(range(-10, 11)) and angles.count(0.0) > angles.count(5.0)
    names = [type(t).__name__ for t in standard_transforms()]
    assert names == ["Pad", "Jitter", "RandomScale", "RandomRotate", "Jitter"]
    custom = visualize(color_units(), ("1", 0), transforms=[Pad(2), lambda im: im.flip(-1)],
                       **FAST)
    assert custom.shape == (1, 3, 32, 32)


def test_regularizers_values_and_effect():
    grey = torch.full((2, 3, 8, 8), 0.5)
    ones = torch.ones(1, 3, 8, 8)
    stripes = torch.zeros(1, 3, 8, 8)
    stripes[..., ::2] = 1.0
    assert float(L1(2.0)(ones)) == pytest.approx(1.0)
    assert float(L2(2.0)(ones)) == pytest.approx(0.5)
    assert TotalVariation()(grey).tolist() == [0.0, 0.0] and float(Blur()(grey).sum()) == 0
    assert float(TotalVariation(1.0)(stripes)) == pytest.approx(1.0)
    assert float(TotalVariation(1.0, beta=1.0)(stripes)) == pytest.approx(1.0, abs=1e-3)
    assert float(Blur()(stripes)) > 0
    model = color_units()
    plain = visualize(model, ("1", 0), **FAST)
    damped = visualize(model, ("1", 0), regularizers=[L2(50.0)], **FAST)
    assert (damped - 0.5).abs().mean() < 0.5 * (plain - 0.5).abs().mean()


# --------------------------------------------------------------------------- output


def test_save_grid_and_unit_images(tmp_path):
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    path = save_grid(images, tmp_path / "g" / "grid.png", ncol=3, pad=2)
    grid = cv2.imread(str(path))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    tile = cv2.cvtColor(grid[2:18, 2:18], cv2.COLOR_BGR2RGB)
    assert np.array_equal(tile, np.round(images[0].permute(1, 2, 0).numpy() * 255))
    labelled = cv2.imread(str(save_grid(images, tmp_path / "l.png", labels=list("abcde"))))
    assert labelled.shape[0] > 16
    paths = save_unit_images(images[:3], tmp_path, "features.10", [3, 7, 12])
    assert list(paths) == [3, 7, 12]
    assert paths[7] == tmp_path / "features.10" / "unit_0007.png" and paths[7].is_file()
    with pytest.raises(DissectError):
        save_unit_images(images, tmp_path, "x", [1, 2])


TINY_FACTORY = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
"""


def test_cli_actmax_and_invert_write_pngs(tmp_path, capsys):
    spec = tmp_path / "tiny.py"
    spec.write_text(TINY_FACTORY)
    out = tmp_path / "out"
    code = main(["actmax", f"{spec}:make", "--layer", "3", "--units", "0-2,5", "--size", "32",
                 "--steps", "8", "--out", str(out), "--quiet"])
    assert code == 0
    files = sorted(p.name for p in (out / "3").iterdir())
    assert files == ["unit_0000.png", "unit_0001.png", "unit_0002.png", "unit_0005.png"]
    assert cv2.imread(str(out / "3" / "unit_0005.png")).shape == (32, 32, 3)
    assert (out / "3_grid.png").is_file()
    assert main(["actmax", f"{spec}:make", "--layer", "3", "--size", "32", "--steps", "2",
                 "--out", str(tmp_path / "all"), "--quiet"]) == 0  # default: every unit
    assert len(list((tmp_path / "all" / "3").iterdir())) == 6

    image = tmp_path / "cat.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    code = main(["invert", f"{spec}:make", "--layer", "1", "--image", str(image), "--size", "24",
                 "--steps", "4", "--out", str(out), "--quiet"])
    assert code == 0
    assert cv2.imread(str(out / "cat_1.png")).shape == (24, 24, 3)
    assert (out / "cat_1_pair.png").is_file()
    assert "cat_1_pair.png" in capsys.readouterr().out

    code = main(["actmax", f"{spec}:make", "--layer", "3", "--units", "9", "--steps", "2",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "6 channels" in err[0]
