"""A private, faster copy of a model for the many forward/backward passes of an optimization.

Optimizing an image runs the model hundreds of times in eval mode and never needs weight
gradients. A copy can be made cheaper without changing what it computes:

- every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` inside an ``nn.Sequential``
  is folded into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced
  by ``nn.Identity``, so the BatchNorm's name still yields its output. A pair whose convolution
  output is itself requested is left alone. The result is equal up to float rounding.
- parameters do not require grad (no weight gradients);
- on the CPU, channels-last memory layout (oneDNN's fast path, about 2x on MobileNetV2).

The caller's model is never modified: not moved, not switched to eval, not hooked.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger("dissect.actmax")


def _foldable_pairs(model: nn.Module, keep: set[str]) -> list[tuple[nn.Module, str, str]]:
    pairs = []
    for name, parent in model.named_modules():
        plain = type(parent).forward is nn.Sequential.forward
        if not isinstance(parent, nn.Sequential) or not plain:
            continue  # only a plain Sequential guarantees that the BN consumes the conv output
        kids = list(parent._modules.items())
        for (n1, conv), (n2, bn) in zip(kids, kids[1:], strict=False):
            full = f"{name}.{n1}" if name else n1
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and full not in keep
                    and bn.running_mean is not None and bn.running_var is not None
                    and not (conv._forward_hooks or conv._forward_pre_hooks
                             or bn._forward_hooks or bn._forward_pre_hooks)):
                pairs.append((parent, n1, n2))
    return pairs


def fold_batchnorm(model: nn.Module, keep: Iterable[str] = ()) -> int:
    """Fold eval-mode BatchNorms into the convolutions before them, in place.

    Parameters
    ----------
    model
        A model in eval mode (typically a copy).
    keep
        Layer names whose own output must stay observable (their pair is not folded).

    Returns
    -------
    int
        Number of BatchNorms folded.
    """
    pairs = _foldable_pairs(model, set(keep))
    for parent, n1, n2 in pairs:
        parent._modules[n1] = fuse_conv_bn_eval(parent._modules[n1], parent._modules[n2])
        parent._modules[n2] = nn.Identity()
    return len(pairs)


def fast_copy(model: nn.Module, device: torch.device, keep: Iterable[str] = ()) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device`` prepared for input-gradient optimization.

    Falls back to a plain (unfolded) copy if folding fails, and to ``model`` itself (put in
    eval mode by the caller) if it cannot be deep-copied.

    Parameters
    ----------
    model
        The caller's model (left untouched).
    device
        Where the copy lives.
    keep
        Layer names that are read (see :func:`fold_batchnorm`).

    Returns
    -------
    torch.nn.Module
    """
    try:
        fast = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any model that cannot be copied is used as is
        log.debug("model cannot be deep-copied (%s); optimizing on the model itself", exc)
        return model
    fast.to(device).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    try:
        folded = fold_batchnorm(fast, keep)
    except Exception as exc:  # noqa: BLE001 - folding is an optimization, never a requirement
        log.debug("BatchNorm folding failed (%s); using an unfolded copy", exc)
        fast = copy.deepcopy(model).to(device).eval()
        for p in fast.parameters():
            p.requires_grad_(False)
        folded = 0
    for p in fast.parameters():  # fuse_conv_bn_eval makes new parameters
        p.requires_grad_(False)
    if device.type == "cpu":
        fast.to(memory_format=torch.channels_last)
    log.debug("optimization copy: %d BatchNorm(s) folded, %s", folded,
              "channels-last" if device.type == "cpu" else "default layout")
    return fast
