"""Trace: outputs equal a manual forward, gradients equal autograd, hooks never outlive it."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import FunctionalNet, ReusedReLU, TinyCNN
from torch import nn

from dissect import DissectError, LayerNotFoundError, Trace, layer_names
from dissect.hooks import resolve_layers


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_layer_names_are_named_modules(tiny):
    assert layer_names(tiny) == [str(i) for i in range(8)]
    r18 = torchvision.models.resnet18()
    names = layer_names(r18)
    assert "layer4.1.conv2" in names and "" not in names
    assert names == [n for n, _ in r18.named_modules() if n]


def test_outputs_equal_manual_forward(tiny, images):
    with torch.no_grad(), Trace(tiny, ["0", "2", "5", "7"]) as tr:
        out = tiny(images)
        conv1 = tiny[0](images)
        pooled = tiny[2](torch.relu(conv1))
        conv2 = torch.relu(tiny[3](pooled))
        gap = conv2.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(tr.outputs["0"], conv1, rtol=0, atol=0)
    torch.testing.assert_close(tr.outputs["2"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(tr.outputs["5"], gap, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tr.outputs["7"], out, rtol=0, atol=0)


def test_inplace_relu_cannot_corrupt_recorded_output(tiny, images):
    # layer "0" is a conv followed by ReLU(inplace=True), which overwrites the conv's output
    with torch.no_grad(), Trace(tiny, "0") as tr:
        tiny(images)
    expected = torch.nn.functional.conv2d(images, tiny[0].weight, tiny[0].bias, padding=1)
    assert (tr.outputs["0"] < 0).any()
    torch.testing.assert_close(tr.outputs["0"], expected)
    assert not tr.outputs["0"].requires_grad


def test_grads_equal_autograd(tiny, images):
    # reference: run the layers one by one and ask autograd for d(out)/d(intermediate)
    h0 = tiny[0](images)
    h = tiny[2](torch.relu(h0))
    h3 = tiny[3](h)
    out = tiny[7](tiny[6](tiny[5](torch.relu(h3))))
    g0, g3 = torch.autograd.grad(out[:, 1].sum(), [h0, h3])
    with Trace(tiny, ["0", "3"], grads=True) as tr:
        tiny(images)[:, 1].sum().backward()
    # "0" is modified in place by the next ReLU: the gradient is still w.r.t. the conv output
    torch.testing.assert_close(tr.grads["0"], g0)
    torch.testing.assert_close(tr.grads["3"], g3)


def test_grads_need_autograd(tiny, images):
    with pytest.raises(DissectError, match="does not require grad"):
        with torch.no_grad(), Trace(tiny, "3", grads=True):
            tiny(images)
    assert _hook_count(tiny) == 0
    with pytest.raises(DissectError, match="stop"):
        Trace(tiny, "3", grads=True, stop=True)


def test_hooks_removed_when_body_raises(tiny, images):
    with pytest.raises(RuntimeError, match="boom"):
        with Trace(tiny, ["0", "3"]):
            tiny(images)
            raise RuntimeError("boom")
    assert _hook_count(tiny) == 0


def test_hooks_removed_when_forward_raises(tiny):
    with pytest.raises(RuntimeError):
        with Trace(tiny, ["0", "3"]):
            tiny(torch.zeros(2, 5, 16, 16))  # wrong channel count
    assert _hook_count(tiny) == 0
    # and the model works untouched afterwards
    assert tiny(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_stop_ends_forward_after_last_layer(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), _Counter(), nn.Conv2d(4, 2, 1))
    after = []
    with Trace(model, ["0", "1"], stop=True) as tr:
        model(images)
        after.append(True)  # never reached: the forward is the last statement under stop=True
    assert set(tr.outputs) == {"0", "1"}
    assert model[2].calls == 0 and after == []
    assert _hook_count(model) == 0
    with Trace(model, ["3"], stop=True) as tr:  # stopping at the last layer is harmless
        model(images)
    assert tr.outputs["3"].shape == (10, 2, 16, 16) and model[2].calls == 1


def test_module_run_twice_records_first_call(images):
    torch.manual_seed(0)
    model = ReusedReLU().eval()
    with torch.no_grad(), Trace(model, "relu") as tr:
        model(images)
        first = torch.relu(model.conv1(images))
    assert tr.calls["relu"] == 2
    torch.testing.assert_close(tr.outputs["relu"], first)
    # stop=True stops at that first call, so the second conv never runs
    with torch.no_grad(), Trace(model, ["relu", "conv1"], stop=True) as tr:
        model(images)
    assert tr.calls["relu"] == 1


def test_basicblock_relu_policy():
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), Trace(r18, ["layer1.0.relu", "layer1.0.bn1", "layer1.0"]) as tr:
        r18(x)
    torch.testing.assert_close(tr.outputs["layer1.0.relu"], torch.relu(tr.outputs["layer1.0.bn1"]))
    assert tr.calls["layer1.0.relu"] == 2


def test_functional_relu_model_traced(images):
    model = FunctionalNet().eval()
    with torch.no_grad(), Trace(model, lambda n: n in ("conv", "head")) as tr:
        out = model(images)
    assert list(tr.outputs) == ["conv", "head"]
    torch.testing.assert_close(tr.outputs["head"], out)


def test_unknown_layer_names_closest():
    r18 = torchvision.models.resnet18()
    with pytest.raises(LayerNotFoundError, match="layer4.1.conv2") as info:
        Trace(r18, ["layer4.1.conv"])
    assert isinstance(info.value, DissectError)
    with pytest.raises(DissectError, match="selected no layer"):
        resolve_layers(r18, lambda n: False)
    with pytest.raises(DissectError, match="no layers requested"):
        resolve_layers(r18, [])
    with pytest.raises(LayerNotFoundError):
        resolve_layers(r18, [3])


def test_selector_forms(tiny):
    assert resolve_layers(tiny, "3") == ["3"]
    assert resolve_layers(tiny, ["3", "0", "3"]) == ["3", "0"]
    assert resolve_layers(tiny, lambda n: n in "04") == ["0", "4"]


def test_reentering_gives_fresh_outputs(images):
    model = TinyCNN().eval()
    tr = Trace(model, "0")
    with torch.no_grad(), tr:
        model(images[:2])
    with torch.no_grad(), tr:
        model(images[:3])
    assert tr.outputs["0"].shape[0] == 3 and tr.calls["0"] == 1


def test_non_tensor_output_is_a_clear_error(images):
    class Words(nn.Module):
        def forward(self, x):
            return {"a": "no tensor here", "b": [None]}

    model = nn.Sequential(Words())
    with pytest.raises(DissectError, match="holds no tensor"):
        with Trace(model, "0"):
            model(images)
    assert _hook_count(model) == 0


# --------------------------------------------------------------------------- edit (#23)


def _zero_channel(c):
    def edit(name, m):
        m = m.clone()
        m[:, c] = 0
        return m
    return edit


def test_edit_replaces_the_output_inside_the_forward(tiny, images):
    with torch.no_grad(), Trace(tiny, "3", edit=_zero_channel(2)) as tr:
        out = tiny(images)
    with torch.no_grad():
        h = tiny[3](tiny[2](torch.relu(tiny[0](images))))
        h[:, 2] = 0
        expected = tiny[7](tiny[6](tiny[5](torch.relu(h))))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (tr.outputs["3"][:, 2] == 0).all()  # the edited output is what is recorded
    assert _hook_count(tiny) == 0
    with torch.no_grad(), Trace(tiny, ["0", "3"], edit={"3": lambda n, m: None}):
        assert torch.equal(tiny(images), tiny(images))  # None leaves the output


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return {"pair": (y, x.mean()), "aux": y.sum()}


class UsesTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleOut()

    def forward(self, x):
        out = self.block(x)
        return out["pair"][0].mean(dim=(2, 3)) + out["pair"][1] + out["aux"]


def test_edit_writes_back_into_dict_and_tuple_outputs(images):
    model = UsesTuple().eval()
    with torch.no_grad():
        plain = model(images)
        y = model.block.conv(images)
        for select in (None, lambda out: out["pair"][0]):
            with Trace(model, "block", edit=_zero_channel(1), select=select) as tr:
                out = model(images)
            assert (tr.outputs["block"][:, 1] == 0).all()
            torch.testing.assert_close(out[:, 1], plain[:, 1] - y[:, 1].mean(dim=(1, 2)))
            torch.testing.assert_close(out[:, 0], plain[:, 0])
        with pytest.raises(DissectError, match="cannot write the edit"):
            with Trace(model, "block", edit=lambda n, m: m + 1, select=lambda o: o["aux"] * 1):
                model(images)
    assert _hook_count(model) == 0


def test_edit_of_a_vit_token_layer_changes_one_hidden_dim_of_the_patches():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    layer = "encoder.layers.encoder_layer_0"
    module = dict(vit.named_modules())[layer]
    x = torch.randn(2, 3, 32, 32)
    seen = []
    with torch.no_grad():
        with Trace(vit, layer) as tr0:
            vit(x)
        with Trace(vit, layer, edit=_zero_channel(5)) as tr:
            handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
            try:
                vit(x)
            finally:
                handle.remove()
    tokens = seen[0]  # what the next block received: (B, 1 + 16, 16)
    with torch.no_grad(), Trace(vit, layer, tokens=None) as raw:
        vit(x)
    before = raw.outputs[layer]
    changed = (tokens != before)
    assert changed[:, 1:, 5].all() and not changed[:, 1:, :5].any()
    assert not changed[:, 1:, 6:].any() and not changed[:, 0].any()  # class token kept
    assert (tr.outputs[layer][:, 5] == 0).all() and tr.outputs[layer].shape == (2, 16, 4, 4)
    torch.testing.assert_close(tr.prefix[layer], tr0.prefix[layer])
    assert _hook_count(vit) == 0


def test_token_grid_to_tokens_inverts_to_map():
    from dissect.hooks import TokenGrid

    raw = torch.randn(2, 1 + 6, 5)
    grid = TokenGrid(prefix=1, grid=(2, 3))
    m = grid.to_map(raw)
    assert torch.equal(grid.to_tokens(m, raw), raw)
    edited = m + 1
    back = grid.to_tokens(edited, raw)
    assert torch.equal(grid.to_map(back), edited) and torch.equal(back[:, :1], raw[:, :1])
    nhwc = torch.randn(2, 3, 4, 5)
    assert torch.equal(TokenGrid.nhwc().to_tokens(TokenGrid.nhwc().to_map(nhwc), nhwc), nhwc)
    with pytest.raises(DissectError, match="cannot replace"):
        grid.to_tokens(torch.zeros(2, 5, 3, 2), raw)


def test_edit_errors_leave_no_hooks(tiny, images):
    with pytest.raises(DissectError, match="shape"):
        with torch.no_grad(), Trace(tiny, "3", edit=lambda n, m: m[:, :2]):
            tiny(images)
    assert _hook_count(tiny) == 0
    with pytest.raises(RuntimeError, match="inside"):
        with torch.no_grad(), Trace(tiny, "3", edit=_zero_channel(0)):
            tiny(images)
            raise RuntimeError("inside")
    assert _hook_count(tiny) == 0
    with pytest.raises(DissectError, match="not traced"):
        Trace(tiny, "3", edit={"0": _zero_channel(0)})
    with pytest.raises(DissectError, match="function"):
        Trace(tiny, "3", edit={"3": 5})


def test_edit_applies_to_every_call(images):
    model = ReusedReLU().eval()
    calls = []

    def edit(name, m):
        calls.append(m.shape)
        return torch.zeros_like(m)

    with torch.no_grad(), Trace(model, "relu", edit=edit) as tr:
        out = model(images)
    assert len(calls) == 2 and tr.calls["relu"] == 2 and (out == 0).all()
