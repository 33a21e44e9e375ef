"""FastBatchNormGrad: the same bits as PyTorch's eval-mode BatchNorm backward, scoped."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dissect._plumbing.batchnorm_grad import FastBatchNormGrad


def _randomize_statistics(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _input_grad(model: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    if fast:
        with FastBatchNormGrad():
            out = model(x)
    else:
        out = model(x)
    return torch.autograd.grad(out[:, 1].sum() + out.pow(2).mean(), x)[0]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_input_gradients_are_bit_identical(name, channels_last):
    torch.manual_seed(0)
    model = _randomize_statistics(getattr(torchvision.models, name)())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_input_grad(model, x, True), _input_grad(model, x, False))


@pytest.mark.parametrize("bn", [nn.BatchNorm1d(6), nn.BatchNorm1d(6, affine=False),
                                nn.BatchNorm2d(6, affine=False), nn.BatchNorm3d(6)],
                         ids=["1d", "1d-no-affine", "2d-no-affine", "3d"])
def test_other_batchnorms_and_shapes(bn):
    model = _randomize_statistics(nn.Sequential(bn))
    shape = {nn.BatchNorm1d: (4, 6, 5), nn.BatchNorm2d: (4, 6, 5, 5),
             nn.BatchNorm3d: (4, 6, 3, 3, 3)}[type(bn)]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3
    x = x.detach().requires_grad_(True)
    grads = []
    for fast in (True, False):
        with FastBatchNormGrad() if fast else torch.enable_grad():
            y = model(x)
        grads.append(torch.autograd.grad((y * torch.arange(y.numel()).view(y.shape)).sum(), x)[0])
        assert torch.equal(y, model(x))  # same forward bits
    assert torch.equal(grads[0], grads[1])


def test_training_mode_and_parameter_gradients_are_left_alone():
    bn = nn.BatchNorm2d(4).train()
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    with FastBatchNormGrad():
        y = bn(x)
    assert y.grad_fn.name().startswith("NativeBatchNormBackward")  # the ordinary op
    bn.eval()
    with FastBatchNormGrad():
        y = bn(x)
    assert not y.grad_fn.name().startswith("NativeBatchNormBackward")
    # outside the mode, nothing is changed
    assert bn(x).grad_fn.name().startswith("NativeBatchNormBackward")
    # an input that needs no gradient (e.g. parameters only) keeps the ordinary op
    with FastBatchNormGrad():
        y = bn(x.detach())
    assert y.grad_fn.name().startswith("NativeBatchNormBackward")
