"""Attribution maps: equal to captum, complete, saturation-aware, memory-bounded, hook-clean."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision
from conftest import Recorder, TinyCNN
from torch import nn

from dissect import DissectError, LayerNotFoundError
from dissect.attribution import (
    grad_cam,
    grad_x_input,
    heatmap,
    integrated_gradients,
    last_spatial_layer,
    occlusion,
    overlay,
    quadrature,
    saliency,
    save_png,
    smoothgrad,
)
from dissect.cli import main
from dissect.datasets import read_image

IG_METHODS = ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
              "gausslegendre"]
TARGETS = [3, 7]
CPU = "cpu"


def assert_equal_to(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within ``rtol`` relative, elementwise and to the map's scale (near-zero entries
    are compared against ``rtol * max|ref|``: float32 sums taken in another order differ by
    a few ulps of the largest terms, not of the result)."""
    ref = ref.detach()
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * scale)


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.fixture(scope="module")
def captum_attr():
    """captum.attr, the reference oracle (a test-only dependency: the `test` extra)."""
    return pytest.importorskip("captum.attr")


@pytest.fixture(scope="module", params=[("resnet18", "layer4"), ("mobilenet_v2", "features.18")],
                ids=["resnet18", "mobilenet_v2"])
def net(request):
    name, layer = request.param
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x, layer


class Saturating(nn.Module):
    """f(x) = tanh(2 x0) + 0.1 x1: past x0 ~ 2 more x0 no longer raises f (the elephant's trunk)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2 * x[:, 0]) + 0.1 * x[:, 1]


class Cubic(nn.Module):
    """f(x) = sum(x^3) / 3, so df/dx = x^2: a noisy input x + e has E[grad] = x^2 + sigma^2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x**3).flatten(1).sum(1) / 3


class Square(nn.Module):
    """f(x) = sum(x^2): IG from baseline b is exactly x^2 - b^2 for rules exact on lines."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x**2).flatten(1).sum(1)


# --------------------------------------------------------------------------- equal to captum


@pytest.mark.parametrize("use_abs", [True, False])
def test_saliency_equals_captum(captum_attr, net, use_abs):
    model, x, _ = net
    ref = captum_attr.Saliency(model).attribute(x.clone().requires_grad_(), target=TARGETS,
                                                abs=use_abs)
    assert_equal_to(saliency(model, x, TARGETS, abs=use_abs, device=CPU), ref)


def test_grad_x_input_equals_captum(captum_attr, net):
    model, x, _ = net
    ref = captum_attr.InputXGradient(model).attribute(x.clone().requires_grad_(), target=TARGETS)
    assert_equal_to(grad_x_input(model, x, TARGETS, device=CPU), ref)


@pytest.mark.parametrize("method", IG_METHODS)
def test_integrated_gradients_equals_captum(captum_attr, net, method):
    model, x, _ = net
    baseline = torch.full_like(x, 0.25)
    ours, delta = integrated_gradients(model, x, TARGETS, baseline=baseline, steps=7,
                                       method=method, batch_size=5, return_delta=True,
                                       device=CPU, progress=False)
    ref, ref_delta = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=baseline, target=TARGETS, n_steps=7, method=method,
        return_convergence_delta=True)
    assert_equal_to(ours, ref)
    with torch.no_grad():
        gain = model(x)[[0, 1], TARGETS] - model(baseline)[[0, 1], TARGETS]
    scale = float(gain.abs().max())
    torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=1e-5 * scale)


def test_integrated_gradients_default_baseline_and_steps_equal_captum(captum_attr, net):
    model, x, _ = net
    ours = integrated_gradients(model, x, 5, batch_size=40, device=CPU, progress=False)
    ref = captum_attr.IntegratedGradients(model).attribute(x, target=5, internal_batch_size=40)
    assert_equal_to(ours, ref)


@pytest.mark.parametrize(
    "window, stride, baseline",
    [((3, 16, 16), (3, 16, 16), 0.0), ((2, 20, 18), (1, 12, 13), 0.3), ((3, 24, 24), 12, "tensor")],
    ids=["gray-patches", "uneven-clipped", "tensor-baseline"],
)
def test_occlusion_equals_captum(captum_attr, net, window, stride, baseline):
    model, x, _ = net
    if baseline == "tensor":
        baseline = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(2))
    # batch_size=len(x): one window per forward, the batching captum uses by default, so both
    # evaluate every occluded input in the same batch (see test_batch_size_only_bounds_memory)
    ours = occlusion(model, x, TARGETS, window=window, stride=stride, baseline=baseline,
                     batch_size=len(x), device=CPU, progress=False)
    ref = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=window, strides=stride, target=TARGETS,
        baselines=baseline[None] if isinstance(baseline, torch.Tensor) else baseline)
    assert_equal_to(ours, ref)


def test_occlusion_window_shortcuts(net):
    model, x, _ = net
    full = occlusion(model, x, 1, window=(3, 16, 16), stride=(1, 16, 16), device=CPU)
    torch.testing.assert_close(occlusion(model, x, 1, window=(16, 16), device=CPU), full)
    torch.testing.assert_close(occlusion(model, x, 1, window=16, stride=16, device=CPU), full)


@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam_equals_captum_layer_grad_cam(captum_attr, net, relu):
    model, x, layer = net
    module = dict(model.named_modules())[layer]
    ref = captum_attr.LayerGradCam(model, module).attribute(x, target=TARGETS,
                                                           relu_attributions=relu)
    raw = grad_cam(model, x, TARGETS, layer, relu=relu, interpolation=None, device=CPU)
    assert_equal_to(raw, ref[:, 0])
    for mode in ("bilinear", "nearest"):
        up = captum_attr.LayerAttribution.interpolate(ref, (64, 64), interpolate_mode=mode)
        ours = grad_cam(model, x, TARGETS, layer, relu=relu, interpolation=mode, device=CPU)
        assert ours.shape == (2, 64, 64)
        assert_equal_to(ours, up[:, 0])
    assert_equal_to(grad_cam(model, x, TARGETS, module, relu=relu, device=CPU),
                    captum_attr.LayerAttribution.interpolate(ref, (64, 64), "bilinear")[:, 0])


def test_smoothgrad_is_the_mean_saliency_of_its_noisy_inputs(captum_attr, net):
    model, x, _ = net
    rec = Recorder(model)
    ours = smoothgrad(rec, x, TARGETS, n=6, sigma=0.2, batch_size=5, device=CPU, progress=False)
    noisy = torch.cat(rec.inputs)  # step-major rows: draw i of input b is row i * B + b
    assert noisy.shape == (12, 3, 64, 64)
    ref = captum_attr.Saliency(model).attribute(noisy.clone().requires_grad_(),
                                                target=TARGETS * 6)
    assert_equal_to(ours, ref.view(6, 2, 3, 64, 64).mean(0))
    # the noise: draw i is one standard normal tensor, scaled by 0.2 x each input's range
    spread = 0.2 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(1, 2, 1, 1, 1)
    eps = (noisy.view(6, 2, 3, 64, 64) - x) / spread
    torch.testing.assert_close(eps[:, 0], eps[:, 1], rtol=1e-4, atol=1e-4)
    assert float(eps[:, 0].mean()) == pytest.approx(0, abs=0.02)
    assert float(eps[:, 0].std()) == pytest.approx(1, abs=0.02)


def test_grad_cam_layer_followed_by_inplace_relu(captum_attr):
    # TinyCNN's layer "0" is a conv whose output a ReLU(inplace=True) overwrites: the map must
    # use the conv's own output and the gradient with respect to it
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    ref = captum_attr.LayerGradCam(model, model[0]).attribute(x, target=[0, 1, 2],
                                                             relu_attributions=True)
    assert_equal_to(grad_cam(model, x, [0, 1, 2], "0", interpolation=None, device=CPU),
                    ref[:, 0])


# --------------------------------------------------------------------------- known answers


def test_integrated_gradients_completeness():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    model[1], model[4] = nn.Softplus(), nn.Tanh()  # smooth, so 64 Gauss points integrate it
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    attr, delta = integrated_gradients(model, x, [0, 1, 2], steps=64, return_delta=True,
                                       device=CPU)
    with torch.no_grad():
        out, out0 = model(x), model(torch.zeros_like(x))
    gain = out[[0, 1, 2], [0, 1, 2]] - out0[[0, 1, 2], [0, 1, 2]]
    sums = attr.flatten(1).sum(1)
    # the reported delta is exactly the completeness error ...
    torch.testing.assert_close(sums - gain, delta, rtol=0, atol=1e-6)
    # ... and it is small next to the gain it accounts for
    assert (delta.abs() <= 1e-3 * gain.abs().max()).all()


@pytest.mark.parametrize("method", ["riemann_middle", "gausslegendre"])
def test_integrated_gradients_exact_on_a_quadratic(method):
    # f = sum(x^2): the integrand 2 (b + a (x - b)) is linear in a, so midpoint and
    # Gauss-Legendre rules are exact and IG = (x - b)(x + b) = x^2 - b^2
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    b = torch.full_like(x, -0.5)
    attr = integrated_gradients(Square(), x, None, baseline=b, steps=9, method=method,
                                device=CPU)
    torch.testing.assert_close(attr, x**2 - b**2, rtol=1e-7, atol=1e-7)


def test_saturation_gradient_is_zero_but_integrated_gradients_gives_credit():
    x = torch.tensor([[5.0, 1.0]])
    grad = saliency(Saturating(), x, None, abs=False, device=CPU)
    assert abs(float(grad[0, 0])) < 1e-3  # saturated: the gradient says x0 does not matter
    assert float(grad[0, 1]) == pytest.approx(0.1)
    attr, delta = integrated_gradients(Saturating(), x, None, return_delta=True, device=CPU)
    # the path from 0 credits x0 with everything tanh(2 x0) contributes, x1 with 0.1 * 1
    assert float(attr[0, 0]) == pytest.approx(float(torch.tanh(torch.tensor(10.0))), abs=1e-4)
    assert float(attr[0, 1]) == pytest.approx(0.1, abs=1e-6)
    assert abs(float(delta[0])) < 1e-4


def test_quadrature_matches_captum(captum_attr):
    from captum.attr._utils.approximation_methods import approximation_parameters

    for method in IG_METHODS:
        for n in (2, 7, 50):
            sizes, alphas = approximation_parameters(method)
            assert quadrature(method, n) == (sizes(n), alphas(n))


def test_smoothgrad_sigma_is_a_fraction_of_each_inputs_range():
    # df/dx = x^2, so the mean gradient over draws is x^2 + sigma_b^2 with
    # sigma_b = sigma * (max(x_b) - min(x_b)), different for the two inputs
    x = torch.zeros(2, 1, 20, 20, dtype=torch.float64)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0, 4.0  # ranges 1 and 4
    sg = smoothgrad(Cubic(), x, None, n=400, sigma=0.25, abs=False, batch_size=128,
                    device=CPU, progress=False)
    var = (sg - x**2).flatten(1).mean(1)
    expected = (0.25 * torch.tensor([1.0, 4.0], dtype=torch.float64)) ** 2
    torch.testing.assert_close(var, expected, rtol=0.05, atol=0)


def test_smoothgrad_sigma_conversion_matches_captum_noise_tunnel(captum_attr):
    # captum's NoiseTunnel takes an absolute stdev: sigma * (x.max() - x.min()) for one input.
    # Both estimate E[grad] = x^2 + stdev^2 of the cubic model; compare the estimates.
    x = torch.zeros(1, 1, 20, 20, dtype=torch.float64)
    x[0, 0, 0, 0] = 2.0
    ours = smoothgrad(Cubic(), x, None, n=300, sigma=0.2, abs=False, device=CPU, progress=False)
    torch.manual_seed(0)
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(Cubic())).attribute(
        x, nt_type="smoothgrad", nt_samples=300, stdevs=0.2 * float(x.max() - x.min()),
        abs=False)
    torch.testing.assert_close((ours - x**2).mean(), (ref - x**2).mean(), rtol=0.05, atol=0)
    torch.testing.assert_close((ours - x**2).mean(), torch.tensor(0.4**2, dtype=x.dtype),
                               rtol=0.05, atol=0)


def test_smoothgrad_noise_is_reproducible_and_independent_of_batching(net):
    model, x, _ = net
    runs = {}
    for name, xs, target, batch_size in (("a", x, TARGETS, 3), ("b", x, TARGETS, None),
                                         ("alone", x[1:], TARGETS[1], 3)):
        rec = Recorder(model)
        runs[name] = smoothgrad(rec, xs, target, n=4, batch_size=batch_size, device=CPU,
                                progress=False)
        runs[name + " rows"] = torch.cat(rec.inputs)  # step-major: row r is input r % B
    a, b, alone = runs["a"], runs["b"], runs["alone"]
    # the noisy rows are bit-identical however they are batched, and input 1's noise does not
    # depend on input 0 being there
    assert torch.equal(runs["a rows"], runs["b rows"])
    assert torch.equal(runs["a rows"][1::2], runs["alone rows"])
    # the maps agree up to the batch-size-dependent rounding of the convolutions (which can
    # flip a ReLU gate of a random-init network, so not always to 1e-5 elementwise)
    for ours, ref in ((a, b), (a[1:], alone)):
        assert float((ours - ref).norm() / ref.norm()) < 1e-2
    other = smoothgrad(model, x, TARGETS, n=4, seed=1, device=CPU, progress=False)
    assert (a - other).abs().max() > 0.01 * a.abs().max()


def test_targets_int_list_tensor_callable_agree(net):
    model, x, _ = net
    by_list = saliency(model, x, [4, 4], device=CPU)
    for target in (4, torch.tensor([4, 4]), torch.tensor(4), lambda out: out[:, 4]):
        torch.testing.assert_close(saliency(model, x, target, device=CPU), by_list)
    ig_list = integrated_gradients(model, x, [4, 9], steps=4, device=CPU)
    ig_fn = integrated_gradients(model, x, lambda out: out[:, 4], steps=4, device=CPU)
    torch.testing.assert_close(ig_list[0], ig_fn[0])


def test_batch_size_only_bounds_memory():
    torch.manual_seed(0)
    model = Recorder(TinyCNN().double().eval())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    calls = {
        "ig": lambda bs: integrated_gradients(model, x, [0, 1, 2], steps=10, batch_size=bs,
                                              device=CPU),
        "smoothgrad": lambda bs: smoothgrad(model, x, [0, 1, 2], n=7, batch_size=bs, device=CPU),
        "occlusion": lambda bs: occlusion(model, x, [0, 1, 2], window=(3, 6, 6), stride=3,
                                          batch_size=bs, device=CPU),
    }
    for name, call in calls.items():
        results = []
        for bs in (4, 7, None):
            model.inputs.clear()
            results.append(call(bs))
            largest = max(len(rows) for rows in model.inputs)
            assert bs is None or largest <= bs, name
        for other in results[1:]:
            torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-14, msg=name)


def test_channels_last_inputs_keep_their_format_and_results():
    """A channels-last batch stays channels-last through the perturbed rows (faster kernels)."""
    model = TinyCNN().double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    xc = x.contiguous(memory_format=torch.channels_last)
    seen = []
    handle = model[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        for call in (lambda v: integrated_gradients(model, v, [0, 1, 2], steps=6, batch_size=5,
                                                    device=CPU),
                     lambda v: smoothgrad(model, v, [0, 1, 2], n=3, device=CPU),
                     lambda v: occlusion(model, v, [0, 1, 2], window=(3, 6, 6), stride=4,
                                         device=CPU)):
            seen.clear()
            expected = call(x)
            assert seen and not any(seen)
            seen.clear()
            got = call(xc)
            assert seen and all(seen)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()


# --------------------------------------------------------------------------- model hygiene


def test_hooks_removed_modes_restored_grads_untouched(net):
    model, x, layer = net
    model.train()
    model.get_submodule(layer).eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    try:
        grad_cam(model, x, TARGETS, layer, device=CPU)
        integrated_gradients(model, x, TARGETS, steps=2, device=CPU)
        occlusion(model, x, TARGETS, window=32, device=CPU)
        with pytest.raises(DissectError):
            grad_cam(model, x, [1, 2, 3], layer, device=CPU)  # one target too many
        with pytest.raises(DissectError):
            grad_cam(model, x, lambda out: out, layer, device=CPU)  # not one score per row
        assert _hooks(model) == 0
        assert {name: m.training for name, m in model.named_modules()} == before
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_works_under_no_grad_and_inference_mode(net):
    model, x, layer = net
    expected = saliency(model, x, 1, device=CPU)
    with torch.no_grad():
        torch.testing.assert_close(saliency(model, x, 1, device=CPU), expected)
    with torch.inference_mode():
        xi = x.clone()
        torch.testing.assert_close(saliency(model, xi, 1, device=CPU), expected)
        assert grad_cam(model, xi, 1, layer, device=CPU).shape == (2, 64, 64)


def test_errors_say_what_to_do(net):
    model, x, layer = net
    with pytest.raises(LayerNotFoundError, match="Closest valid names: " + layer[:6]):
        grad_cam(model, x, 1, "layer5" if layer == "layer4" else "features.19", device=CPU)
    with pytest.raises(DissectError, match="spatial maps"):
        grad_cam(model, x, 1, "fc" if layer == "layer4" else "classifier.1", device=CPU)
    with pytest.raises(DissectError, match="one index per input"):
        saliency(model, x, [1, 2, 3], device=CPU)
    with pytest.raises(DissectError, match="out of range"):
        saliency(model, x, 1000, device=CPU)
    with pytest.raises(DissectError, match="gausslegendre"):
        integrated_gradients(model, x, 1, method="simpson", device=CPU)
    with pytest.raises(DissectError, match=">= 2"):
        integrated_gradients(model, x, 1, method="riemann_left", steps=1, device=CPU)
    with pytest.raises(DissectError, match="does not fit"):
        integrated_gradients(model, x, 1, baseline=torch.zeros(3, 32, 32), device=CPU)
    with pytest.raises(DissectError, match="between 1 and the input size"):
        occlusion(model, x, 1, window=(3, 80, 8), device=CPU)
    with pytest.raises(DissectError, match="stride <= window"):
        occlusion(model, x, 1, window=8, stride=9, device=CPU)
    with pytest.raises(DissectError, match="batched"):
        saliency(model, x[0, 0, 0], 1, device=CPU)
    with pytest.raises(DissectError, match="batch_size"):
        smoothgrad(model, x, 1, batch_size=0, device=CPU)


# --------------------------------------------------------------------------- pictures and CLI


def test_overlay_heatmap_and_png(tmp_path):
    image = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(6))
    attr = torch.zeros(3, 32, 40)
    attr[:, 10:20, 5:15] = 1.0
    out = overlay(image, attr, "jet", alpha=0.5)
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, attr, alpha=0.0),
                                  np.round(image.permute(1, 2, 0).numpy() * 255))
    hot = heatmap(attr, "jet")
    np.testing.assert_array_equal(overlay(image, attr, alpha=1.0), hot)
    assert tuple(hot[15, 10]) == (128, 0, 0) and tuple(hot[0, 0]) == (0, 0, 128)  # jet ends
    cam = torch.zeros(4, 5)
    cam[1, 1] = 2.0
    assert overlay(image, cam, "inferno").shape == (32, 40, 3)  # small maps are resized
    as_numpy = overlay((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                       attr.numpy()[None], colormap=cv2.COLORMAP_JET)
    np.testing.assert_allclose(as_numpy, out, atol=1)  # uint8 image, batch-of-one map
    path = save_png(tmp_path / "sub" / "o.png", out)
    np.testing.assert_array_equal(read_image(path), out)
    with pytest.raises(DissectError, match="colormap"):
        overlay(image, attr, "no-such-map")


def _tiny_factory(tmp_path):
    file = tmp_path / "net.py"
    file.write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),\n"
        "                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))\n"
    )
    image = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    save_png(image, rng.integers(0, 256, (60, 50, 3), dtype=np.uint8))
    return f"{file}:make", image


@pytest.mark.parametrize("method", ["saliency", "grad_x_input", "smoothgrad", "ig", "occlusion",
                                    "gradcam"])
def test_cli_attribute_writes_png_and_npy(tmp_path, capsys, method):
    spec, image = _tiny_factory(tmp_path)
    out = tmp_path / "maps"
    argv = ["attribute", spec, "--image", str(image), "--method", method, "--target", "2",
            "--out", str(out), "--steps", "4", "--samples", "3", "--window", "56",
            "--stride", "56", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert "img.png: class 2 (p=" in capsys.readouterr().out
    assert read_image(out / "attribution" / f"img_{method}.png").shape == (224, 224, 3)
    amap = np.load(out / "attribution" / f"img_{method}.npy")
    assert amap.shape == ((224, 224) if method == "gradcam" else (3, 224, 224))
    assert np.isfinite(amap).all() and np.abs(amap).max() > 0


def test_cli_attribute_errors_are_one_line(tmp_path, capsys):
    spec, image = _tiny_factory(tmp_path)
    code = main(["attribute", spec, "--image", str(image), "--method", "gradcam", "--layer",
                 "nope", "--out", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "nope" in err[0]


def test_last_spatial_layer():
    assert last_spatial_layer(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64),
                              device=CPU) == "layer4"
