"""Grad-CAM (Selvaraju et al., 2017): a layer's maps weighted by their pooled gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._plumbing.checks import batched_input
from .._plumbing.device import as_module, prepared
from ..errors import DissectError
from ..hooks import Trace
from ._core import Target, check_target, scores, to_device

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "linear", "trilinear")


def _layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name:
                return name
        raise DissectError(
            f"the {type(layer).__name__} module given as layer is not a submodule of the model; "
            "pass its dotted name (see dissect.hooks.layer_names)"
        )
    return layer


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    layer: str | nn.Module,
    *,
    relu: bool = True,
    interpolation: str | None = "bilinear",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Grad-CAM: ``relu(sum_c mean_hw(dy/dA_c) * A_c)`` for a layer's output ``A``.

    The map before upsampling equals captum's
    ``LayerGradCam(model, layer).attribute(x, target, relu_attributions=relu)`` (without its
    channel dim); the upsampled map equals captum's
    ``LayerAttribution.interpolate(cam, x.shape[2:], interpolate_mode=interpolation)``, i.e.
    ``torch.nn.functional.interpolate`` with ``align_corners=False``. Note captum's
    ``relu_attributions`` defaults to ``False`` and its ``interpolate`` to ``"nearest"``; the
    paper's map applies the ReLU, and bilinear upsampling is the usual way to show it.

    The layer is traced with :class:`dissect.hooks.Trace` (hooks are removed on exit, also on
    errors); a module called several times in one forward contributes its first call.

    Parameters
    ----------
    model, x, target, device
        As for :func:`dissect.attribution.saliency`; ``x`` is ``(B, C, H, W)`` for images.
    layer
        The layer's dotted name (``"layer4"``, ``"features.18"``; see
        :func:`dissect.hooks.layer_names`) or the module itself. Its output must have spatial
        dims, ``(B, K, h, w)``.
    relu
        Keep only the positive evidence (the paper's Grad-CAM).
    interpolation
        ``torch.nn.functional.interpolate`` mode used to upsample the map to ``x``'s spatial
        size (``"bilinear"``, ``"nearest"``, ``"bicubic"``, ...); ``None`` returns the map at
        the layer's resolution ``(B, h, w)``.

    Returns
    -------
    torch.Tensor
        ``(B, H, W)`` (``x``'s spatial size), or ``(B, h, w)`` when ``interpolation`` is
        ``None``; on ``x``'s device.
    """
    x = batched_input(x)
    target = check_target(target, x.shape[0])
    name = _layer_name(as_module(model), layer)
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise DissectError(f"unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}")
    with prepared(model, device) as run:
        model = run.module
        xd = to_device(x, run).requires_grad_(True)
        with Trace(model, name, grads=True) as tr:
            values = scores(model(xd), target)
            if name in tr.outputs and values.requires_grad:
                torch.autograd.grad(values.sum(), xd)
        if name not in tr.outputs:
            raise DissectError(
                f"layer {name!r} did not run in the forward pass (an unused module?)"
            )
        acts = tr.outputs[name]
        grads = tr.grads.get(name)
        if grads is None:
            raise DissectError(
                f"no gradient reached layer {name!r}: the target does not depend on it"
            )
        if acts.ndim < 3:
            raise DissectError(
                f"Grad-CAM needs a layer with spatial maps (B, K, h, w), but {name!r} outputs "
                f"shape {tuple(acts.shape)}: choose a convolutional layer (e.g. the last one)"
            )
        spatial = tuple(range(2, acts.ndim))
        cam = torch.sum(torch.mean(grads, dim=spatial, keepdim=True) * acts, dim=1, keepdim=True)
        if relu:
            cam = F.relu(cam)
        if interpolation is not None:
            size = tuple(x.shape[2:])
            if len(size) != len(spatial):
                raise DissectError(
                    f"cannot upsample a {len(spatial)}-D map of layer {name!r} to inputs of shape "
                    f"{tuple(x.shape)}; use interpolation=None"
                )
            cam = F.interpolate(cam, size, mode=interpolation)
    return cam[:, 0].detach().to(x.device)


def last_spatial_layer(model: nn.Module, x: torch.Tensor,
                       device: str | torch.device | None = None) -> str:
    """The layer Grad-CAM usually explains: the last one to output spatial maps.

    Runs one forward pass on ``x`` and returns the name of the module that finished last
    among those whose output is ``(B, K, h, w)`` with ``h * w > 1`` (``"layer4"`` for
    torchvision's ResNets, ``"features"`` for MobileNetV2).

    Parameters
    ----------
    model
        The network (run in eval mode; its mode is restored).
    x
        A batch of inputs, e.g. ``x[:1]``.
    device
        Where to run; see :func:`dissect.attribution.saliency`.

    Returns
    -------
    str
    """
    from ..hooks import layer_names

    x = batched_input(x)
    order: list[str] = []

    def shape(name: str, t: torch.Tensor) -> tuple[int, ...]:
        order.append(name)
        return tuple(t.shape)

    with prepared(model, device) as run, torch.no_grad():
        model = run.module
        with Trace(model, layer_names(model), record=shape) as tr:
            model(to_device(x, run))
    spatial = [n for n in order if len(tr.outputs[n]) == 4 and tr.outputs[n][2] *
               tr.outputs[n][3] > 1]
    if not spatial:
        raise DissectError("the model has no layer with (B, K, h, w) outputs for Grad-CAM")
    return spatial[-1]
