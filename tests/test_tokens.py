"""Token outputs as maps (#24): TokenGrid, token_layout, tokens= and select= in Trace and
capture, what stores record, and a planted ViT labelled by Network Dissection."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import hooked, tiny_vit
from torch import nn

from dissect.datasets import SyntheticConcepts
from dissect.distributed import consolidate
from dissect.errors import DissectError, LayerNotFoundError, StoreError
from dissect.hooks import TokenGrid, Trace, capture, token_layout
from dissect.netdissect import dissect

BLOCK = "encoder.layers.encoder_layer_1"


def _by_hand(tokens: torch.Tensor, prefix: int, h: int, w: int) -> np.ndarray:
    """(B, N, C) tokens -> (B, C, h, w), one patch at a time (no reshape of ours)."""
    b, _, c = tokens.shape
    out = np.zeros((b, c, h, w), dtype=np.float32)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, prefix + i * w + j].numpy()
    return out


# ---------------------------------------------------------------------------- TokenGrid

def test_token_grid_reshapes_row_major_after_the_prefix():
    t = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    got = TokenGrid(prefix=1, grid=(2, 3)).to_map(t)
    np.testing.assert_array_equal(got.numpy(), _by_hand(t, 1, 2, 3))
    np.testing.assert_array_equal(TokenGrid(prefix=1).prefix_tokens(t).numpy(), t[:, :1])
    square = TokenGrid(prefix=2).to_map(torch.zeros(1, 2 + 16, 5))
    assert square.shape == (1, 5, 4, 4)


def test_channels_last_maps_are_permuted():
    t = torch.randn(2, 3, 4, 5)
    got = TokenGrid.nhwc().to_map(t)
    assert torch.equal(got, t.permute(0, 3, 1, 2))
    assert TokenGrid.from_json(TokenGrid.nhwc().to_json()) == TokenGrid.nhwc()
    assert TokenGrid.from_json(TokenGrid(4, (7, 5)).to_json()) == TokenGrid(4, (7, 5))


@pytest.mark.parametrize("grid, tokens, message", [
    (TokenGrid(prefix=1), 1 + 12, "not a square"),
    (TokenGrid(prefix=1, grid=(3, 3)), 1 + 12, "do not fill the grid"),
    (TokenGrid(prefix=5), 5, "no patch tokens"),
])
def test_token_counts_that_do_not_fit_are_refused(grid, tokens, message):
    with pytest.raises(DissectError, match=message):
        grid.to_map(torch.zeros(2, tokens, 4), "blk")


@pytest.mark.parametrize("kwargs, message", [
    ({"prefix": -1}, "prefix"), ({"grid": (0, 3)}, "grid"), ({"grid": (3,)}, "grid"),
    ({"prefix": 1, "channels_last": True}, "prefix=0"),
])
def test_bad_token_grids_are_refused(kwargs, message):
    with pytest.raises(DissectError, match=message):
        TokenGrid(**kwargs)


# ---------------------------------------------------------------------------- layouts

def test_torchvision_vit_layers_are_recognized():
    vit = tiny_vit()
    want = TokenGrid(prefix=1, grid=(7, 7))
    for layer in ("encoder", BLOCK, f"{BLOCK}.self_attention", f"{BLOCK}.mlp", "encoder.ln"):
        assert token_layout(vit, layer) == want
    assert token_layout(vit, "conv_proj") is None and token_layout(vit, "heads") is None
    wrapped = nn.Sequential(nn.Identity(), vit)  # a ViT inside another model
    assert token_layout(wrapped, f"1.{BLOCK}") == want
    assert token_layout(wrapped, "0") is None
    with pytest.raises(LayerNotFoundError):
        token_layout(vit, "encoder.layers.encoder_layer_9")


def test_stored_vit_maps_equal_the_hooked_tokens_reshaped_by_hand(tmp_path):
    vit = tiny_vit()
    x = torch.randn(5, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    layers = [BLOCK, f"{BLOCK}.self_attention", "conv_proj"]
    with capture(vit, x, layers, tmp_path / "v.h5", batch_size=2, dtype="float32",
                 progress=False) as store:
        for layer in layers[:2]:
            raw = hooked(vit, layer, x)  # (5, 50, 64): class token, then 7x7 patches
            assert store[layer].shape == (5, 64, 7, 7)
            np.testing.assert_array_equal(store[layer][:], _by_hand(raw, 1, 7, 7))
            np.testing.assert_array_equal(store.prefix(layer)[:], raw[:, :1].numpy())
            np.testing.assert_array_equal(store.maxima(layer),
                                          _by_hand(raw, 1, 7, 7).max(axis=(2, 3)))
            assert store.layout(layer) == TokenGrid(1, (7, 7))
        assert store.layout("conv_proj") is None
        with pytest.raises(StoreError, match="no prefix tokens"):
            store.prefix("conv_proj")
    with h5py.File(tmp_path / "v.h5") as f:
        assert "tokens" in f.attrs and "prefix" in f


def test_trace_gradients_of_token_layers_are_maps_too():
    vit = tiny_vit()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["out"] = output

    handle = dict(vit.named_modules())[BLOCK].register_forward_hook(keep)
    try:
        with Trace(vit, BLOCK, grads=True) as tr:
            vit(x)[:, 3].sum().backward()
    finally:
        handle.remove()
    tokens, grads = seen["out"].detach(), seen["out"].grad
    np.testing.assert_array_equal(tr.outputs[BLOCK].numpy(), _by_hand(tokens, 1, 7, 7))
    np.testing.assert_array_equal(tr.grads[BLOCK].numpy(), _by_hand(grads, 1, 7, 7))
    assert torch.equal(tr.prefix[BLOCK], tokens[:, :1])
    assert tr.layouts[BLOCK] == TokenGrid(1, (7, 7))


def test_tokens_none_keeps_the_tokens_and_a_grid_can_be_given(tmp_path):
    vit = tiny_vit()
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode(), Trace(vit, BLOCK, tokens=None) as raw:
        vit(x)
    assert raw.outputs[BLOCK].shape == (2, 50, 64) and raw.layouts[BLOCK] is None
    with torch.inference_mode(), Trace(vit, BLOCK, tokens={BLOCK: TokenGrid(2, (4, 12))}) as tr:
        vit(x)
    assert tr.outputs[BLOCK].shape == (2, 64, 4, 12)
    with pytest.raises(LayerNotFoundError):
        Trace(vit, BLOCK, tokens={"encoder.layers.encoder_layer_7": None})
    with pytest.raises(DissectError, match="tokens must be"):
        Trace(vit, BLOCK, tokens="square")


def test_unrecognized_3d_outputs_are_refused_and_1d_convolutions_are_not(tmp_path):
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
    x = torch.randn(2, 3, 10)
    with pytest.raises(DissectError, match=r"tokens=TokenGrid\(prefix=P, grid=\(h, w\)\)"):
        with Trace(model, ["0", "1"]):
            model(x)
    with Trace(model, ["0", "1"], tokens={"1": None}) as tr:
        model(x)
    assert tr.outputs["1"].shape == (2, 4, 8)
    # a grid for tokens of an unrecognized model: 1 prefix + 2x4
    seq = nn.Sequential(nn.Identity())
    t = torch.randn(3, 9, 6)
    with capture(seq, t, ["0"], tmp_path / "t.h5", tokens=TokenGrid(1, (2, 4)),
                 dtype="float32", progress=False) as store:
        np.testing.assert_array_equal(store["0"][:], _by_hand(t, 1, 2, 4))
        np.testing.assert_array_equal(store.prefix("0")[:], t[:, :1].numpy())


def test_a_store_is_not_reused_with_another_token_layout(tmp_path):
    vit = tiny_vit()
    x = torch.randn(2, 3, 112, 112)
    capture(vit, x, [BLOCK], tmp_path / "v.h5", progress=False).close()
    with pytest.raises(StoreError, match="tokens"):
        capture(vit, x, [BLOCK], tmp_path / "v.h5", progress=False, tokens=None)


def test_consolidate_keeps_layouts_and_prefix_tokens(tmp_path):
    vit = tiny_vit()
    x = torch.randn(3, 3, 112, 112)
    capture(vit, x, [BLOCK], tmp_path / "v.h5", progress=False).close()
    with consolidate(tmp_path / "v.h5", tmp_path / "c.h5") as copy, \
            capture(vit, x, [BLOCK], tmp_path / "v.h5", progress=False) as store:
        assert copy.layout(BLOCK) == store.layout(BLOCK)
        np.testing.assert_array_equal(copy.prefix(BLOCK)[:], store.prefix(BLOCK)[:])
        np.testing.assert_array_equal(copy[BLOCK][:], store[BLOCK][:])


# ---------------------------------------------------------------------------- outputs

class Several(nn.Module):
    """Returns a dict, a tuple or a dataclass of tensors (first: the input doubled)."""

    @dataclasses.dataclass
    class Out:
        note: str
        main: torch.Tensor
        extra: torch.Tensor

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        a, b = x * 2, x + 1
        if self.kind == "dict":
            return {"loss": None, "main": a, "extra": b}
        if self.kind == "tuple":
            return ("text", (a, b))
        return self.Out("text", a, b)


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_the_first_tensor_of_a_structured_output_is_the_layers_output(kind):
    model = nn.Sequential(Several(kind))
    x = torch.randn(2, 4, 3, 3)
    with Trace(model, "0") as tr:
        model(x)
    assert torch.equal(tr.outputs["0"], x * 2)


def test_a_selector_chooses_another_tensor(tmp_path):
    x = torch.randn(2, 4, 3, 3)
    model = nn.Sequential(Several("dict"))
    for select in ("extra", {"0": "extra"}, lambda out: out["extra"]):
        with Trace(model, "0", select=select) as tr:
            model(x)
        assert torch.equal(tr.outputs["0"], x + 1)
    with capture(nn.Sequential(Several("dataclass")), x, ["0"], tmp_path / "s.h5",
                 select="extra", dtype="float32", progress=False) as store:
        np.testing.assert_array_equal(store["0"][:], (x + 1).numpy())
    vit = tiny_vit()  # nn.MultiheadAttention's (output, weights): item 0 is the output
    img = torch.randn(1, 3, 112, 112)
    name = f"{BLOCK}.self_attention"
    with torch.inference_mode(), Trace(vit, name, select=0) as tr:
        vit(img)
    assert tr.outputs[name].shape == (1, 64, 7, 7)


@pytest.mark.parametrize("kind, select, message", [
    ("dict", "nope", "has the keys"),
    ("tuple", 5, "with 2 items"),
    ("dict", 0, "with no items"),
    ("dataclass", "note", "not a tensor"),
    ("dataclass", "nope", "no such key or attribute"),
    ("dict", 1.5, "an index, a key or a callable"),
])
def test_selectors_that_do_not_fit_are_refused(kind, select, message):
    model = nn.Sequential(Several(kind))
    with pytest.raises(DissectError, match=message):
        with Trace(model, "0", select=select):
            model(torch.randn(1, 2))


# ---------------------------------------------------------------------------- timm, Swin

def test_timm_vit_with_register_tokens_and_a_non_square_grid(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=4,
                            img_size=(112, 80), num_classes=5, depth=2).eval()
    assert token_layout(vit, "blocks.1") == TokenGrid(prefix=5, grid=(7, 5))
    assert token_layout(vit, "patch_embed") == TokenGrid(prefix=0, grid=(7, 5))
    assert token_layout(vit, "patch_embed.proj") is None and token_layout(vit, "head") is None
    x = torch.randn(3, 3, 112, 80)
    with capture(vit, x, ["blocks.1", "patch_embed"], tmp_path / "t.h5", dtype="float32",
                 progress=False) as store:
        raw = hooked(vit, "blocks.1", x)  # (3, 5 + 35, 192)
        np.testing.assert_array_equal(store["blocks.1"][:], _by_hand(raw, 5, 7, 5))
        np.testing.assert_array_equal(store.prefix("blocks.1")[:], raw[:, :5].numpy())
        np.testing.assert_array_equal(store["patch_embed"][:],
                                      _by_hand(hooked(vit, "patch_embed", x), 0, 7, 5))


def test_swin_nhwc_blocks_are_stored_channels_first(tmp_path):
    pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=16,
                           depths=(1, 1), num_heads=(1, 2), num_classes=3).eval()
    tv = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    for model, layer, conv in ((swin, "layers.1", "patch_embed.proj"),
                               (tv, "features.3", "features.0.0")):
        assert token_layout(model, layer) == TokenGrid.nhwc()
        assert token_layout(model, conv) is None
        with capture(model, x, [layer], tmp_path / f"{type(model).__module__}.h5",
                     dtype="float32", progress=False) as store:
            raw = hooked(model, layer, x)  # (2, 8, 8, 32)
            assert raw.ndim == 4 and raw.shape[-1] == 32
            np.testing.assert_array_equal(store[layer][:], raw.permute(0, 3, 1, 2).numpy())


# ---------------------------------------------------------------------------- planted ViT

def planted_vit() -> nn.Module:
    """A ViT whose blocks pass their input on and whose channel 0 is each patch's mean of
    ``r - g/2 - b/2``: a red detector on the patch grid."""
    vit = tiny_vit(seed=4)
    with torch.no_grad():
        for block in vit.encoder.layers:
            block.self_attention.out_proj.weight.zero_()
            block.self_attention.out_proj.bias.zero_()
            block.mlp[3].weight.zero_()
            block.mlp[3].bias.zero_()
        vit.class_token.zero_()
        vit.encoder.pos_embedding.zero_()
        vit.conv_proj.bias.zero_()
        vit.conv_proj.weight[0] = torch.tensor([1.0, -0.5, -0.5]).view(3, 1, 1) / 256
    return vit


def test_a_planted_vit_channel_is_labelled_red(tmp_path):
    vit = planted_vit()
    ds = SyntheticConcepts(300, size=112)
    res = dissect(vit, ds, [BLOCK], quantile=0.02, batch_size=50, progress=False,
                  store_path=tmp_path / "vit.h5")
    unit = res.units(BLOCK)[0]
    assert (unit.concept, unit.category) == ("red", "color")
    assert unit.is_detector and unit.iou > 0.4  # random channels: 0.1 or less on red
    with capture(vit, ds, [BLOCK], tmp_path / "vit.h5", progress=False) as store:
        assert store.layout(BLOCK) == TokenGrid(1, (7, 7))  # reused: nothing more to say


# ---------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("text, want", [
    ("auto", "auto"), ("none", None), ("NHWC", TokenGrid.nhwc()), ("5", TokenGrid(5)),
    ("1:14x14", TokenGrid(1, (14, 14))), ("5:7x5", TokenGrid(5, (7, 5))),
])
def test_tokens_from_text(text, want):
    from dissect.hooks.tokens import parse_tokens

    assert parse_tokens(text) == want


@pytest.mark.parametrize("text", ["square", "1:14", "1:axb", "-1"])
def test_bad_tokens_text_is_refused(text):
    from dissect.hooks.tokens import parse_tokens

    with pytest.raises(DissectError):
        parse_tokens(text)


def test_cli_reads_token_layers_as_maps(tmp_path, capsys):
    from dissect.cli import main

    factory = tmp_path / "vit.py"
    factory.write_text("import torchvision\n\ndef make():\n    return torchvision.models."
                       "VisionTransformer(image_size=224, patch_size=32, num_layers=1, "
                       "num_heads=2, hidden_dim=32, mlp_dim=64)\n")
    spec = f"{factory}:make"
    assert main(["layers", spec, "--input-size", "224", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "encoder.layers.encoder_layer_0 " in shown
    assert "32x7x7 (tokens: 1 prefix + 7x7 patches)" in shown
    args = ["capture", spec, "--data", "synthetic:4", "--layers",
            "encoder.layers.encoder_layer_0", "--quiet", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "a.h5")]) == 0
    assert "encoder.layers.encoder_layer_0: (4, 32, 7, 7)" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "b.h5"), "--tokens", "none"]) == 0
    assert "encoder.layers.encoder_layer_0: (4, 50, 32)" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "c.h5"), "--tokens", "1:1x49"]) == 0
    assert "encoder.layers.encoder_layer_0: (4, 32, 1, 49)" in capsys.readouterr().out


def test_cli_actmax_deconv_and_invert_take_token_layers(tmp_path, capsys):
    from skimage import data as skdata
    from skimage.io import imsave

    from dissect.cli import main

    factory = tmp_path / "vit.py"
    factory.write_text("import torchvision\n\ndef make():\n    return torchvision.models."
                       "VisionTransformer(image_size=224, patch_size=32, num_layers=1, "
                       "num_heads=2, hidden_dim=32, mlp_dim=64)\n")
    spec, block = f"{factory}:make", "encoder.layers.encoder_layer_0"
    assert main(["actmax", spec, "--layer", block, "--units", "0-1", "--steps", "2",
                 "--size", "224", "--transforms", "resized", "--out", str(tmp_path / "am"),
                 "--quiet"]) == 0
    assert (tmp_path / "am" / f"{block}_grid.png").exists()
    assert main(["deconv", spec, "--layer", block, "--units", "0", "--data", "synthetic:4",
                 "--method", "gradient", "-k", "2", "--out", str(tmp_path / "dc"),
                 "--quiet"]) == 0
    imsave(tmp_path / "cat.png", skdata.chelsea())
    assert main(["invert", spec, "--layer", block, "--image", str(tmp_path / "cat.png"),
                 "--steps", "2", "--size", "224", "--out", str(tmp_path / "inv"),
                 "--quiet"]) == 0
    capsys.readouterr()


def test_pooled_token_layers_open_and_keep_their_class_token(tmp_path):
    vit = tiny_vit()
    x = torch.randn(3, 3, 112, 112)
    with capture(vit, x, [BLOCK], tmp_path / "p.h5", pool="mean", dtype="float32",
                 progress=False) as store:
        raw = hooked(vit, BLOCK, x)
        np.testing.assert_allclose(store[BLOCK][:], raw[:, 1:].mean(1).numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(store.prefix(BLOCK)[:], raw[:, :1].numpy())
        assert store.layout(BLOCK) == TokenGrid(1, (7, 7))


def test_a_dissection_records_its_token_layouts(tmp_path):
    vit = tiny_vit()
    ds = SyntheticConcepts(8, size=112)
    res = dissect(vit, ds, [BLOCK, "conv_proj"], batch_size=8, progress=False,
                  store_path=tmp_path / "d.h5")
    assert res.meta["tokens"] == {BLOCK: {"prefix": 1, "grid": [7, 7], "channels_last": False,
                                          "class_token": True}}


def test_register_tokens_without_a_class_token_are_not_read_as_one(tmp_path):
    timm = pytest.importorskip("timm")
    from dissect.probes import probe

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=2,
                            class_token=False, global_pool="avg", img_size=64, depth=1,
                            num_classes=2).eval()
    grid = token_layout(vit, "blocks.0")
    assert grid == TokenGrid(prefix=2, grid=(4, 4), class_token=False)
    x = torch.randn(8, 3, 64, 64)
    with capture(vit, x, ["blocks.0"], tmp_path / "r.h5", progress=False) as store:
        assert store.layout("blocks.0") == grid
        with pytest.raises(DissectError, match="no class token"):
            probe(store, np.arange(8) % 2, pool="cls", progress=False)
