"""Deconvnet, receptive fields and top patches on Vision Transformers (#24): units are hidden
dimensions, positions are patches, GELU networks are refused by the ReLU rules, and a patch of
a layer after attention is the whole image."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from dissect import DissectError, StoreError, capture
from dissect.deconvnet import receptive_field, reconstruct, top_patches
from dissect.hooks import TokenGrid

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = "encoder.layers.encoder_layer_1"
LN = "encoder.layers.encoder_layer_0.ln_1"  # before the first attention: one patch's field
SIDE = 7


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.rand(3, 112, 112, generator=g) for _ in range(5)]


def _tokens(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's raw ``(B, 1 + 49, C)`` tokens, by a plain hook."""
    got = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: got.setdefault("t", o))
    try:
        model(x)
    finally:
        handle.remove()
    return got["t"]


def _token_grad(model: nn.Module, layer: str, x: torch.Tensor, token: int, unit: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The token's value and value * d token / d x, by a plain hook (no dissect code)."""
    got = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: got.setdefault("t", o))
    xs = x.clone().requires_grad_(True)
    try:
        model(xs)
    finally:
        handle.remove()
    value = got["t"][:, token, unit]
    (grad,) = torch.autograd.grad(value, xs, value.detach())
    return value.detach(), grad


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_rectifier_rules_are_refused_on_a_gelu_vit(vit, data, method):
    x = torch.stack(data[:2])
    with pytest.raises(DissectError, match=r"ReLU networks.*gelu.*method='gradient'"):
        reconstruct(vit, x, BLOCK, [3], method=method, progress=False)
    with pytest.raises(DissectError, match=r"ReLU networks.*attention"):
        reconstruct(vit, x, "encoder.layers.encoder_layer_0.self_attention", [3], method=method,
                    progress=False)
    with pytest.raises(DissectError, match="ReLU networks"):  # the default method, too
        top_patches(vit, data, BLOCK, [3], k=2, method=method, progress=False)


def test_reconstruct_a_token_layer_addresses_hidden_dimensions_and_patches(vit, data):
    x = torch.stack(data[:2])
    for (i, j) in [(0, 0), (4, 2)]:
        proj = reconstruct(vit, x, BLOCK, [5, 9], method="gradient", location=(i, j),
                           progress=False)
        assert proj.shape == (2, 2, 3, 112, 112)
        for k, unit in enumerate([5, 9]):
            _, expected = _token_grad(vit, BLOCK, x, 1 + i * SIDE + j, unit)
            torch.testing.assert_close(proj[:, k], expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(DissectError, match="outside"):
        reconstruct(vit, x, BLOCK, [5], method="gradient", location=(7, 0), progress=False)


def test_receptive_fields_of_a_vit(vit):
    for layer in ("conv_proj", LN):  # one patch: 16 px, stride 16
        field = receptive_field(vit, layer, 112)
        assert not field.is_global
        assert (field.size, field.stride, field.offset, field.map_size) == (
            (16, 16), (16, 16), (0, 0), (SIDE, SIDE))
    for layer in (BLOCK, "encoder.layers.encoder_layer_0.self_attention"):  # attention
        field = receptive_field(vit, layer, 112)
        assert field.is_global and field.map_size == (SIDE, SIDE)
        assert field.box(3, 4) == field.window(3, 4) == (0, 112, 0, 112)


def test_top_patches_after_attention_are_whole_images(vit, data, tmp_path):
    top = top_patches(vit, data, BLOCK, [5, 9], k=2, method="gradient", progress=False)
    assert top.field.is_global and top.images.shape == (2, 2, 3, 112, 112)
    for n, unit in enumerate([5, 9]):
        for rank, p in enumerate(top[unit]):
            assert p.box == p.window == (0, 112, 0, 112)
            i, j = p.position
            assert 0 <= i < SIDE and 0 <= j < SIDE
            value, grad = _token_grad(vit, BLOCK, data[p.row][None], 1 + i * SIDE + j, unit)
            assert p.value == pytest.approx(float(value), rel=1e-4, abs=1e-5)
            torch.testing.assert_close(top.projections[n, rank], grad[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(top.images[n, rank], data[p.row])
    # the top-1 is the strongest patch token over all images (the class token left out)
    with torch.no_grad():
        tokens = _tokens(vit, BLOCK, torch.stack(data))[:, :, 5]
    assert top[5][0].value == pytest.approx(float(tokens[:, 1:].max()), rel=1e-4)
    r, t = divmod(int(tokens[:, 1:].argmax()), SIDE * SIDE)
    assert (top[5][0].row, top[5][0].position) == (r, divmod(t, SIDE))
    # the same from a captured store (its maxima are over the patch map)
    store = capture(vit, data, [BLOCK], tmp_path / "vit.h5", dtype="float32", progress=False)
    with store:
        assert store.layout(BLOCK) == TokenGrid(prefix=1, grid=(SIDE, SIDE))
        again = top_patches(vit, data, BLOCK, [5, 9], k=2, method="gradient", store=store,
                            progress=False)
    assert [p.row for p in again.rows()] == [p.row for p in top.rows()]
    assert [p.position for p in again.rows()] == [p.position for p in top.rows()]
    torch.testing.assert_close(again.projections, top.projections)


def test_top_patches_before_attention_are_the_tokens_patch(vit, data):
    top = top_patches(vit, data, LN, [3], k=3, method="gradient", progress=False)
    assert top.images.shape == (1, 3, 3, 16, 16)
    for rank, p in enumerate(top[3]):
        i, j = p.position
        assert p.box == p.window == (16 * i, 16 * i + 16, 16 * j, 16 * j + 16)
        _, grad = _token_grad(vit, LN, data[p.row][None], 1 + i * SIDE + j, 3)
        y0, y1, x0, x1 = p.window
        assert grad[0].abs().sum() == pytest.approx(float(grad[0, :, y0:y1, x0:x1].abs().sum()))
        torch.testing.assert_close(top.projections[0, rank], grad[0, :, y0:y1, x0:x1],
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(top.images[0, rank], data[p.row][:, y0:y1, x0:x1])


def test_crops_a_fixed_size_model_refuses_are_redone_whole(vit, data):
    """The patch embedding is a convolution, but the ViT refuses 16 px crops of its input."""
    cropped = top_patches(vit, data, "conv_proj", [2, 6], k=2, method="gradient", crop=True,
                          progress=False)
    whole = top_patches(vit, data, "conv_proj", [2, 6], k=2, method="gradient", crop=False,
                        progress=False)
    assert cropped.images.shape[-2:] == (16, 16)
    assert [p.row for p in cropped.rows()] == [p.row for p in whole.rows()]
    torch.testing.assert_close(cropped.projections, whole.projections)


# ------------------------------------------------------------------ unrecognized tokens


class ToTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def token_net() -> nn.Module:
    """A ReLU network whose last layer returns unrecognized (B, 8*8, 4) tokens."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), ToTokens()).eval()


def test_unrecognized_tokens_need_a_grid_and_stores_say_which(tmp_path):
    net = token_net()
    g = torch.Generator().manual_seed(3)
    data = [torch.rand(3, 16, 16, generator=g) for _ in range(4)]
    x = torch.stack(data)
    with pytest.raises(DissectError, match="tokens="):
        reconstruct(net, x, "5", [1], progress=False)
    with pytest.raises(DissectError, match="tokens="):
        top_patches(net, data, "5", [1], k=2, progress=False)
    grid = {"5": TokenGrid(prefix=0, grid=(8, 8))}
    ours = reconstruct(net, x, "5", [1, 3], tokens=grid, progress=False)
    conv = reconstruct(net, x, "4", [1, 3], progress=False)  # the same map, before ToTokens
    torch.testing.assert_close(ours, conv, rtol=0, atol=0)
    field = receptive_field(net, "5", 16, tokens=grid)
    assert field == dataclasses.replace(receptive_field(net, "4", 16), layer="5")
    assert not field.is_global and field.stride == (2, 2)
    direct = top_patches(net, data, "5", [1, 3], k=2, tokens=grid, progress=False)
    store = capture(net, data, ["5"], tmp_path / "t.h5", dtype="float32", tokens=grid,
                    progress=False)
    with store:
        # "auto" leaves the layer unrecognized: the store says how it was read
        from_store = top_patches(net, data, "5", [1, 3], k=2, store=store, progress=False)
        with pytest.raises(StoreError, match="tokens= as at capture"):
            top_patches(net, data, "5", [1, 3], k=2, store=store, tokens=None, progress=False)
        with pytest.raises(StoreError, match="tokens= as at capture"):
            top_patches(net, data, "5", [1, 3], k=2, store=store, progress=False,
                        tokens={"5": TokenGrid(prefix=1)})
    assert [p.row for p in from_store.rows()] == [p.row for p in direct.rows()]
    torch.testing.assert_close(from_store.projections, direct.projections)
