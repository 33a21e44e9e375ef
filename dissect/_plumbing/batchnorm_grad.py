"""A faster, bit-identical input gradient through eval-mode BatchNorm on the CPU.

PyTorch's CPU kernel for the backward of an eval-mode ``batch_norm`` computes the input gradient
``dy * invstd * w`` but also, always, the two reductions that only the weight and bias gradients
need (``sum(dy)`` and ``sum((x - mean) * dy)`` over every position), parallelised over channels
only. When only the input gradient is wanted (attribution maps, deconvnet projections), that
backward costs about as much as the convolution's; on MobileNetV2 a forward and backward pass
gets about 1.3x faster without it.

:class:`FastBatchNormGrad` is a scoped ``TorchFunctionMode``: inside it, every eval-mode
``F.batch_norm`` call on a CPU float32 tensor that requires a gradient runs PyTorch's own
forward kernel (same bits) and, in the backward, computes only ``(dy * invstd) * w`` with
``invstd = float32(1 / sqrt(float64(var) + eps))``: the same operations in the same order as
PyTorch's CPU kernel, so the gradients are bit-identical (tested). No gradient flows to the
BatchNorm's weight, bias or statistics: the mode is for gradients with respect to inputs or
activations only. Other devices and dtypes, and training-mode calls, run unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _EvalBatchNorm(torch.autograd.Function):
    """``batch_norm(x)`` in eval mode whose backward gives the input gradient only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps,
                             torch.backends.cudnn.enabled)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        invstd = (1.0 / torch.sqrt(var.double() + eps)).float().view(shape)
        ctx.save_for_backward(invstd, None if weight is None else weight.view(shape))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        invstd, weight = ctx.saved_tensors
        dx = grad * invstd
        if weight is not None:
            dx.mul_(weight)  # two roundings, in PyTorch's order: (dy * invstd) * w
        return dx, None, None, None, None, None


def _argument(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else default)


class FastBatchNormGrad(TorchFunctionMode):
    """Scope in which eval-mode BatchNorm back-propagates only to its input (see module doc)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            x = args[0] if args else kwargs["input"]
            mean = _argument(args, kwargs, 1, "running_mean", None)
            var = _argument(args, kwargs, 2, "running_var", None)
            weight = _argument(args, kwargs, 3, "weight", None)
            bias = _argument(args, kwargs, 4, "bias", None)
            training = _argument(args, kwargs, 5, "training", False)
            eps = _argument(args, kwargs, 7, "eps", 1e-5)
            if (not training and mean is not None and var is not None and x.requires_grad
                    and x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim >= 2
                    and var.dtype == torch.float32
                    and (weight is None or weight.dtype == torch.float32)):
                return _EvalBatchNorm.apply(
                    x, mean.detach(), var.detach(),
                    None if weight is None else weight.detach(),
                    None if bias is None else bias.detach(), float(eps))
        return func(*args, **kwargs)
