"""Grad-CAM on Vision Transformers (#24): equal to Grad-CAM by hand on the reshaped patch tokens
and to captum's LayerGradCam given the reshape; the empty map after the last block is warned
about; last_spatial_layer picks a layer the class token still depends on; tokens= and select=."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dissect import DissectError
from dissect.attribution import grad_cam, last_spatial_layer
from dissect.hooks import TokenGrid

CPU = "cpu"
TARGETS = [1, 4]
LAST = "encoder.layers.encoder_layer_1"
INNER = ["encoder.layers.encoder_layer_0", f"{LAST}.ln_1"]


def tiny_vit(seed: int = 0, trained_head: bool = True) -> nn.Module:
    """1 class token + 7x7 patches of 64 channels. torchvision initializes the head to zeros
    (a constant output); ``trained_head`` gives it random weights, as training would."""
    torch.manual_seed(seed)
    vit = torchvision.models.VisionTransformer(
        image_size=112, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
    if trained_head:
        nn.init.normal_(vit.heads.head.weight, std=0.5)
    return vit.eval()


def images(n: int = 2, size: int = 112, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def patch_map(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """(B, N, C) -> (B, C, h, w) one patch at a time: patch (i, j) is token prefix + i * w + j."""
    out = torch.zeros(tokens.shape[0], tokens.shape[2], h, w, dtype=tokens.dtype)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, prefix + i * w + j]
    return out


def cam_by_hand(model: nn.Module, layer: str, x: torch.Tensor, targets: list[int],
                prefix: int, grid: tuple[int, int], relu: bool = True) -> torch.Tensor:
    """Grad-CAM from our own hook: the module's tokens and their gradient, class token dropped,
    reshaped patch by patch, channels weighted by their mean gradient."""
    seen: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def hook(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        seen.append(out.detach().clone())
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        xr = x.clone().requires_grad_(True)
        score = model(xr)[torch.arange(len(x)), torch.tensor(targets)].sum()
        torch.autograd.grad(score, xr)
    finally:
        handle.remove()
    acts = patch_map(seen[0], prefix, *grid)
    weights = patch_map(grads[0], prefix, *grid).mean(dim=(2, 3))
    cam = (weights[:, :, None, None] * acts).sum(1)
    return F.relu(cam) if relu else cam


def assert_close_to(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("layer", INNER)
@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam_on_a_vit_block_equals_grad_cam_by_hand(layer, relu, caplog):
    vit, x = tiny_vit(), images()
    ref = cam_by_hand(vit, layer, x, TARGETS, 1, (7, 7), relu)
    with caplog.at_level(logging.WARNING, logger="dissect"):
        raw = grad_cam(vit, x, TARGETS, layer, relu=relu, interpolation=None, device=CPU)
        up = grad_cam(vit, x, TARGETS, layer, relu=relu, device=CPU)
    assert raw.shape == (2, 7, 7) and up.shape == (2, 112, 112)
    assert_close_to(raw, ref)
    assert_close_to(up, F.interpolate(ref[:, None], (112, 112), mode="bilinear")[:, 0])
    assert not caplog.records  # an inner layer's map is not empty
    explicit = grad_cam(vit, x, TARGETS, layer, relu=relu, interpolation=None, device=CPU,
                        tokens={layer: TokenGrid(prefix=1, grid=(7, 7))})
    torch.testing.assert_close(explicit, raw, rtol=0, atol=0)


class ToMap(nn.Module):
    """Patch tokens (B, 49, C) -> (B, C, 7, 7): the reshape captum's LayerGradCam is given."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).unflatten(2, (7, 7))


class MapBlock(nn.Module):
    """A ViT block whose patch tokens pass through a map (same values, same gradients)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.to_map = block, ToMap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.block(x)
        patches = self.to_map(t[:, 1:]).flatten(2).transpose(1, 2)
        return torch.cat([t[:, :1], patches], 1)


def test_grad_cam_on_a_vit_block_equals_captum_given_the_reshape():
    captum_attr = pytest.importorskip("captum.attr")
    vit, x = tiny_vit(), images()
    wrapped = tiny_vit()
    wrapped.encoder.layers.encoder_layer_0 = MapBlock(wrapped.encoder.layers.encoder_layer_0)
    module = wrapped.encoder.layers.encoder_layer_0.to_map
    for relu in (True, False):
        ref = captum_attr.LayerGradCam(wrapped, module).attribute(
            x, target=TARGETS, relu_attributions=relu)
        ours = grad_cam(vit, x, TARGETS, INNER[0], relu=relu, interpolation=None, device=CPU)
        assert_close_to(ours, ref[:, 0].detach())


def test_grad_cam_after_the_last_block_is_empty_and_says_why(caplog):
    vit, x = tiny_vit(), images()
    for layer in (LAST, "encoder.ln"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dissect"):
            cam = grad_cam(vit, x, TARGETS, layer, relu=False, interpolation=None, device=CPU)
        assert torch.count_nonzero(cam) == 0  # patch tokens get exactly no gradient
        assert torch.count_nonzero(cam_by_hand(vit, layer, x, TARGETS, 1, (7, 7), False)) == 0
        (record,) = caplog.records
        message = record.getMessage()
        assert record.levelno == logging.WARNING and repr(layer) in message
        assert "empty" in message and "2 of 2" in message and "class token" in message
        assert "last_spatial_layer" in message


def test_a_constant_output_is_told_apart_from_the_class_token_case(caplog):
    vit = tiny_vit(trained_head=False)  # torchvision's zero head: the logits are constant
    with caplog.at_level(logging.WARNING, logger="dissect"):
        cam = grad_cam(vit, images(), TARGETS, INNER[0], interpolation=None, device=CPU)
    assert torch.count_nonzero(cam) == 0
    (record,) = caplog.records
    assert "does not depend on the input" in record.getMessage()
    assert "class token" not in record.getMessage()


def test_last_spatial_layer_of_a_vit_is_the_last_one_the_class_token_reads():
    vit, x = tiny_vit(), images(1)
    # the last block's ln_1 feeds the keys and values its class token attends to; everything
    # after it reaches the head through the class token only
    assert last_spatial_layer(vit, x, device=CPU) == f"{LAST}.ln_1"
    wrapped = nn.Sequential(nn.Identity(), vit)  # a ViT anywhere inside the model
    assert last_spatial_layer(wrapped, x, device=CPU) == f"1.{LAST}.ln_1"
    assert torch.count_nonzero(grad_cam(vit, x, TARGETS[:1], f"{LAST}.ln_1", relu=False,
                                        device=CPU)) > 0


def test_last_spatial_layer_without_gradients_falls_back_to_the_last_map(caplog):
    vit = tiny_vit(trained_head=False)
    with caplog.at_level(logging.WARNING, logger="dissect"):
        assert last_spatial_layer(vit, images(1), device=CPU) == "encoder"
    assert "no layer's maps receive a gradient" in caplog.text


# --------------------------------------------------------------------------- tokens= and select=


class TinyTokens(nn.Module):
    """A class-token transformer no rule recognizes: 4x4 patches of 4 pixels, two blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block0 = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.block1 = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1)
        return self.head(self.block1(self.block0(t))[:, 0])


def test_unrecognized_token_layers_take_a_token_grid():
    model = TinyTokens().eval()
    x = images(3, size=16)
    with pytest.raises(DissectError, match="TokenGrid"):
        grad_cam(model, x, [0, 1, 2], "block0", device=CPU)
    grid = TokenGrid(prefix=1, grid=(4, 4))
    ours = grad_cam(model, x, [0, 1, 2], "block0", interpolation=None, device=CPU, tokens=grid)
    assert_close_to(ours, cam_by_hand(model, "block0", x, [0, 1, 2], 1, (4, 4)))
    assert last_spatial_layer(model, x[:1], device=CPU) == "embed"  # 3-D outputs: no maps
    assert last_spatial_layer(model, x[:1], device=CPU, tokens={"block0": grid,
                                                               "block1": grid}) == "block0"


class TwoOutputs(nn.Module):
    """Returns (a summary, the map): the map is item 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y.mean(dim=(2, 3)), y


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pair = TwoOutputs()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, y = self.pair(x)
        return self.head(torch.tanh(y).mean(dim=(2, 3)))


def test_select_chooses_the_map_of_a_module_returning_several():
    model, x = PairNet().eval(), images(2, size=8)
    with pytest.raises(DissectError, match="no gradient reached"):
        grad_cam(model, x, [0, 2], "pair", device=CPU)  # the first tensor: the unused summary
    ours = grad_cam(model, x, [0, 2], "pair", select=1, device=CPU)
    torch.testing.assert_close(ours, grad_cam(model, x, [0, 2], "pair.conv", device=CPU),
                               rtol=0, atol=0)
    assert last_spatial_layer(model, x[:1], device=CPU, select={"pair": 1}) == "pair"
