"""Activation maximization on Vision Transformers: units are hidden dimensions, positions are
patches (#24). Known answers read straight from the tokens with a plain forward hook."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from dissect import DissectError
from dissect.actmax import (
    Resize,
    evaluate,
    invert,
    neuron,
    representation_distance,
    standard_transforms,
    visualize,
)
from dissect.hooks import TokenGrid

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = "encoder.layers.encoder_layer_1"
SIDE = 7  # 112 / 16 patches per side


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """A tiny torchvision ViT: 1 class token + 7x7 patches of 16 px, 64 hidden dims, GELU."""
    return tiny_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))


def _tokens(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's raw ``(B, 1 + 49, C)`` tokens, by a plain hook (no dissect code)."""
    got = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: got.setdefault("t", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return got["t"]


def test_a_unit_of_a_token_layer_is_a_hidden_dimension_averaged_over_patches(vit, images):
    tokens = _tokens(vit, BLOCK, images)
    got = evaluate(vit, (BLOCK, 3), images)
    torch.testing.assert_close(got, tokens[:, 1:, 3].mean(1), rtol=1e-4, atol=1e-5)
    # not token 3 (what reading the token axis as channels would give), nor the class token
    assert not torch.allclose(got, tokens[:, 3, :].mean(1), atol=1e-3)
    assert not torch.allclose(got, tokens[:, :, 3].mean(1), atol=1e-6)


def test_neuron_addresses_a_patch_of_the_grid(vit, images):
    tokens = _tokens(vit, BLOCK, images)
    for (y, x) in [(0, 0), (2, 5), (6, 1)]:
        got = evaluate(vit, neuron(BLOCK, 7, y, x), images)
        torch.testing.assert_close(got, tokens[:, 1 + y * SIDE + x, 7], rtol=1e-4, atol=1e-5)
    centre = evaluate(vit, neuron(BLOCK, 7), images)
    torch.testing.assert_close(centre, tokens[:, 1 + 3 * SIDE + 3, 7], rtol=1e-4, atol=1e-5)
    with pytest.raises(DissectError, match="outside"):
        evaluate(vit, neuron(BLOCK, 7, 7, 0), images)


def test_visualize_four_channels_of_a_block_each_image_wins_its_own_channel(vit):
    channels = [3, 10, 17, 40]
    result = visualize(vit, [(BLOCK, c) for c in channels], size=112, steps=24, lr=0.08,
                       transforms=None, seed=0, progress=False, return_result=True)
    assert result.images.shape == (4, 3, 112, 112)
    # means[i, j]: the mean of channel j over the patch tokens of image i, from the raw tokens
    tokens = _tokens(vit, BLOCK, result.images)
    means = tokens[:, 1:, channels].mean(1)
    for j in range(len(channels)):
        others = torch.cat([means[:j, j], means[j + 1:, j]])
        assert means[j, j] > others.max(), (j, means)
    torch.testing.assert_close(torch.from_numpy(result.values).float(), means.diagonal(),
                               rtol=1e-4, atol=1e-4)
    assert result.units == [(BLOCK, c) for c in channels]


def test_invert_a_token_layer_targets_its_patch_map(vit, images):
    """With no steps, the distance reported is the one between the patch maps (the class
    token is not part of the target)."""
    x = images[:2]
    result = invert(vit, x, BLOCK, steps=0, seed=0, progress=False, return_result=True)
    target, start = _tokens(vit, BLOCK, x), _tokens(vit, BLOCK, result.images)
    as_map = lambda t: t[:, 1:].transpose(1, 2).reshape(len(t), -1, SIDE, SIDE)  # noqa: E731
    expected = representation_distance(as_map(target), as_map(start))
    torch.testing.assert_close(torch.from_numpy(result.values).float(), expected,
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected, representation_distance(target, start), rtol=1e-3)
    # a few steps bring the representation closer
    better = invert(vit, x, BLOCK, steps=8, lr=0.1, tv_weight=0, seed=0, progress=False,
                    return_result=True)
    assert (better.values < result.values).all()


def test_fixed_size_models_say_how_to_keep_the_size(vit):
    with pytest.raises(DissectError, match=r"standard_transforms\(size=S\)"):
        visualize(vit, [(BLOCK, 0)], size=112, steps=1, progress=False)
    images = visualize(vit, [(BLOCK, 0)], size=112, steps=2, progress=False,
                       transforms=standard_transforms(size=112))
    assert images.shape == (1, 3, 112, 112)


def test_resize_transform():
    x = torch.rand(2, 3, 10, 14)
    assert Resize(12).apply(x).shape == (2, 3, 12, 12)
    assert Resize((5, 7))(x).shape == (2, 3, 5, 7)
    assert Resize((10, 14)).apply(x) is x
    assert type(standard_transforms(size=32)[-1]) is Resize
    assert len(standard_transforms()) == 5
    with pytest.raises(DissectError, match="positive"):
        Resize(0)


# ------------------------------------------------------------------ unrecognized tokens


class ToTokens(nn.Module):
    """(B, C, h, w) -> (B, h*w, C): a token output no rule recognizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def token_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), ToTokens()).eval()


def test_an_unrecognized_3d_output_is_an_error_that_says_how(images):
    net = token_net()
    x = images[:, :, :32, :24]  # 8 x 6 patches
    with pytest.raises(DissectError, match=r"tokens=TokenGrid\(prefix=P, grid=\(h, w\)\)"):
        visualize(net, [("1", 2)], size=32, steps=1, transforms=None, progress=False)
    with pytest.raises(DissectError, match="tokens="):
        evaluate(net, ("1", 2), x)
    with pytest.raises(DissectError, match="tokens="):
        invert(net, x, "1", steps=1, progress=False)
    conv = net[0](x).detach()
    grid = {"1": TokenGrid(prefix=0, grid=(8, 6))}
    torch.testing.assert_close(evaluate(net, ("1", 2), x, tokens=grid),
                               conv[:, 2].mean((1, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(evaluate(net, neuron("1", 4, 5, 1), x, tokens=grid),
                               conv[:, 4, 5, 1], rtol=1e-5, atol=1e-6)
    # tokens=None keeps the output as it is: "channel" 2 is then token 2, as asked
    torch.testing.assert_close(evaluate(net, ("1", 2), x, tokens=None),
                               conv.flatten(2)[:, :, 2].mean(1), rtol=1e-5, atol=1e-6)
    images_ = visualize(net, [("1", 2)], size=32, steps=2, transforms=None, progress=False,
                        tokens=TokenGrid(prefix=0))
    assert images_.shape == (1, 3, 32, 32)


class Pair(nn.Module):
    """Returns ``(minus, conv)``: the second item is the interesting one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return -y, y


def test_select_chooses_the_tensor_of_a_module_returning_several(images):
    net = nn.Sequential(Pair()).eval()
    y = net[0].conv(images).detach()
    torch.testing.assert_close(evaluate(net, ("0", 1), images), -y[:, 1].mean((1, 2)))
    torch.testing.assert_close(evaluate(net, ("0", 1), images, select=1), y[:, 1].mean((1, 2)))
    torch.testing.assert_close(evaluate(net, ("0", 1), images, select={"0": 1}),
                               y[:, 1].mean((1, 2)))
    up = visualize(net, [("0", 1)], size=16, steps=8, transforms=None, select=1, progress=False)
    down = visualize(net, [("0", 1)], size=16, steps=8, transforms=None, progress=False)
    assert evaluate(net, ("0", 1), up, select=1) > evaluate(net, ("0", 1), down, select=1)
