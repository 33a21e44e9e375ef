"""Backward rules for rectifiers, scoped to a ``with`` block by a ``TorchFunctionMode``.

A :class:`RectifierRules` mode reroutes every rectifier call made while it is active -- the
``nn.ReLU`` / ``nn.ReLU6`` / ``nn.Hardtanh(0, m)`` modules (they call ``F.relu`` /
``F.hardtanh``), and the functional forms ``F.relu``, ``torch.relu``, ``Tensor.relu``,
``relu_``, ``F.relu6``, ``F.hardtanh`` -- through :class:`_Rectifier`, an autograd function
whose forward is the original call (same values, same in-place behaviour) and whose backward
applies the deconvnet or guided-backprop rule. Nothing is patched: leaving the block (also by
an exception) pops the mode, and a model run outside it is untouched. The rules are defined for
ReLU networks: other activations and attention keep their ordinary gradient (a warning names
them), and a network with none of the rectifiers at all is refused
(:meth:`RectifierRules.check`) rather than given its plain gradient under the rule's name.

:class:`SupportMode` is the structural variant used for receptive fields: rectifiers and
other elementwise activations become the identity and max-pooling becomes average pooling over
the same windows, so a NaN sent backwards reaches exactly the input pixels the unit depends on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import DissectError

log = logging.getLogger("dissect.deconvnet")

RULES = ("deconvnet", "guided")

_NN = torch._C._nn


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _relu_like(inplace: bool) -> Callable[[tuple, dict], tuple[float | None, bool] | None]:
    """Parser of a call that is a ReLU; ``inplace`` for the ``relu_`` spellings."""

    def parse(args: tuple, kwargs: dict) -> tuple[float | None, bool]:
        return None, inplace

    return parse


def _parse_f_relu(args: tuple, kwargs: dict) -> tuple[float | None, bool]:
    return None, bool(_arg(args, kwargs, 1, "inplace", False))


def _parse_f_relu6(args: tuple, kwargs: dict) -> tuple[float | None, bool]:
    return 6.0, bool(_arg(args, kwargs, 1, "inplace", False))


def _relu6_like(inplace: bool) -> Callable[[tuple, dict], tuple[float | None, bool]]:
    def parse(args: tuple, kwargs: dict) -> tuple[float | None, bool]:
        return 6.0, inplace

    return parse


def _hardtanh_like(inplace: bool | None) -> Callable[[tuple, dict], tuple[float, bool] | None]:
    """``hardtanh(x, min_val, max_val)`` is a rectifier only when ``min_val == 0``."""

    def parse(args: tuple, kwargs: dict) -> tuple[float, bool] | None:
        low = float(_arg(args, kwargs, 1, "min_val", -1.0))
        high = float(_arg(args, kwargs, 2, "max_val", 1.0))
        if low != 0.0:
            return None
        ip = bool(_arg(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
        return high, ip

    return parse


#: function -> parser returning ``(upper clip or None, in place)``, or None if not a rectifier
RECTIFIERS: dict[Callable, Callable[[tuple, dict], tuple[float | None, bool] | None]] = {
    F.relu: _parse_f_relu,
    torch.relu: _relu_like(False),
    torch.relu_: _relu_like(True),
    torch.Tensor.relu: _relu_like(False),
    torch.Tensor.relu_: _relu_like(True),
    F.relu6: _parse_f_relu6,
    _NN.relu6: _relu6_like(False),
    _NN.relu6_: _relu6_like(True),
    F.hardtanh: _hardtanh_like(None),
    _NN.hardtanh: _hardtanh_like(False),
    _NN.hardtanh_: _hardtanh_like(True),
}

#: activations that keep their ordinary gradient under every rule (reported, not changed)
OTHER_ACTIVATIONS: dict[Callable, str] = {
    F.leaky_relu: "leaky_relu", F.rrelu: "rrelu", F.elu: "elu", F.selu: "selu",
    F.celu: "celu", F.gelu: "gelu", F.silu: "silu", F.mish: "mish",
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.softplus: "softplus",
    F.prelu: "prelu", F.hardtanh: "hardtanh", torch.tanh: "tanh", torch.Tensor.tanh: "tanh",
    F.logsigmoid: "logsigmoid",
}

#: the nonlinear mixing of attention: like :data:`OTHER_ACTIVATIONS`, it keeps its ordinary
#: gradient under every rule (reported, not changed); not made the identity by
#: :class:`SupportMode` (softmax mixes every position it normalizes over)
ATTENTION: dict[Callable, str] = {
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    F.multi_head_attention_forward: "attention",
    F.scaled_dot_product_attention: "attention",
}


class _Rectifier(torch.autograd.Function):
    """``forward``: the original rectifier call. ``backward``: the chosen rule.

    deconvnet: ``relu(g)``; guided: ``relu(g) * (lower < x < upper)`` with ``x`` the
    forward input (``upper`` is ``inf`` for ReLU, 6 for ReLU6).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: Callable[[], torch.Tensor],
                upper: float | None, guided: bool, inplace: bool) -> torch.Tensor:
        ctx.guided = guided
        if guided:  # the forward mask, taken before an in-place call overwrites x
            mask = x > 0
            if upper is not None:
                mask &= x < upper
            ctx.save_for_backward(mask)
        out = call()
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        signal = grad.clamp(min=0)
        if ctx.guided:
            (mask,) = ctx.saved_tensors
            signal = signal * mask
        return signal, None, None, None, None


class RectifierRules(TorchFunctionMode):
    """Scoped backward rules for every rectifier call: ``with RectifierRules("guided"): ...``.

    Parameters
    ----------
    rule
        ``"deconvnet"``: rectifiers pass ``relu(signal)`` backwards, ignoring the forward pass
        (Zeiler & Fergus 2014); ``"guided"``: ``relu(signal)`` where the rectifier's forward
        input was in its linear range, zero elsewhere (Springenberg et al. 2015).

    Attributes
    ----------
    rule
        The rule.
    rerouted
        Number of rectifier calls rerouted so far.
    rectifiers
        Number of rectifier calls seen, rerouted or not (a call without gradients is seen
        but has nothing to reroute).
    others
        Calls of other activations (LeakyReLU, SiLU, GELU, ...) and of attention (softmax)
        seen, by name: they keep their ordinary gradient.
    """

    def __init__(self, rule: str) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}")
        self.rule = rule
        self.guided = rule == "guided"
        self.rerouted = 0
        self.rectifiers = 0
        self.others: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        parser = RECTIFIERS.get(func)
        if parser is not None:
            parsed = parser(args, kwargs)
            x = args[0] if args else kwargs.get("input")
            if parsed is not None:
                self.rectifiers += 1
            if (parsed is not None and isinstance(x, torch.Tensor) and x.requires_grad
                    and torch.is_grad_enabled()):
                upper, inplace = parsed
                self.rerouted += 1
                return _Rectifier.apply(x, lambda: func(*args, **kwargs), upper, self.guided,
                                        inplace)
        name = OTHER_ACTIVATIONS.get(func) or ATTENTION.get(func)
        if name is not None and (parser is None or parser(args, kwargs) is None):
            self.others[name] += 1
        return func(*args, **kwargs)

    def check(self, layer: str) -> None:
        """Refuse a rule that would change nothing on a network that is not a ReLU network.

        Call after a forward pass to ``layer`` under this mode. When the pass met no
        rectifier but other nonlinearities (GELU, SiLU, softmax attention, ...), the rule
        applies nowhere and the "projection" would be the plain gradient under another name.

        Raises
        ------
        DissectError
            In that case, naming the nonlinearities and what to use instead.
        """
        if self.rectifiers == 0 and self.others:
            names = ", ".join(f"{name} ({n} calls)" for name, n in sorted(self.others.items()))
            raise DissectError(
                f"method={self.rule!r} is defined for ReLU networks (Zeiler & Fergus 2014; "
                f"Springenberg et al. 2015), but the forward pass to layer {layer!r} has no "
                f"rectifier (ReLU, ReLU6, hardtanh(0, m)), only {names}: the {self.rule} rule "
                "would change nothing and the result would be the plain gradient under another "
                "name. Use method='gradient' (what it would compute, named honestly), or "
                "dissect.attribution (SmoothGrad, Integrated Gradients, Grad-CAM) for "
                "GELU/SiLU networks and transformers")


def report_others(others: Counter[str], rule: str) -> None:
    """Log once which other activations kept their ordinary gradient under ``rule``."""
    if others:
        names = ", ".join(f"{name} ({n} calls)" for name, n in sorted(others.items()))
        log.warning(
            "%s: the model also uses %s; these keep their ordinary gradient (only ReLU, ReLU6 "
            "and hardtanh(0, m) follow the %s rule)", rule, names, rule
        )


# --------------------------------------------------------------------------- support


_MAX_POOLS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2, F.max_pool3d_with_indices: 3,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3,
}
_ADAPTIVE_MAX_POOLS = {
    F.adaptive_max_pool1d: F.adaptive_avg_pool1d,
    F.adaptive_max_pool2d: F.adaptive_avg_pool2d,
    F.adaptive_max_pool3d: F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d_with_indices: F.adaptive_avg_pool1d,
    F.adaptive_max_pool2d_with_indices: F.adaptive_avg_pool2d,
    F.adaptive_max_pool3d_with_indices: F.adaptive_avg_pool3d,
}
_AVG_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _is_one(value: Any) -> bool:
    return all(v == 1 for v in (value if isinstance(value, (tuple, list)) else (value,)))


class SupportMode(TorchFunctionMode):
    """Make a network's backward pass reach every input its output structurally depends on.

    Rectifiers and the activations of :data:`OTHER_ACTIVATIONS` become the identity (their
    backward could zero a path); max-pooling becomes average pooling over the same windows
    (its backward reaches the whole window, not just the arg-max). Used with a NaN sent
    backwards, whose NaN-ness survives multiplication by any weight, zero included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inexact: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func in RECTIFIERS or func in OTHER_ACTIVATIONS:
            x = args[0] if args else kwargs["input"]
            return x if _arg(args, kwargs, 99, "inplace", False) else x * 1
        dims = _MAX_POOLS.get(func)
        if dims is not None:
            params = dict(zip(_POOL_ARGS, args[1:], strict=False))
            params.update(kwargs)
            x = args[0] if args else params.pop("input")
            with_indices = bool(params.pop("return_indices", False)) or "indices" in getattr(
                func, "__name__", "")
            dilation = params.pop("dilation", 1)
            if not _is_one(dilation):  # no average pool with dilation: keep the max (logged)
                self.inexact.add(f"dilated {getattr(func, '__name__', func)}")
                return func(*args, **kwargs)
            stride = params.get("stride")
            params["stride"] = stride if stride not in (None, [], ()) else params["kernel_size"]
            out = _AVG_POOLS[dims](x, count_include_pad=True, **params)
            if with_indices:
                return out, func(*args, **kwargs)[1]
            return out
        avg = _ADAPTIVE_MAX_POOLS.get(func)
        if avg is not None:
            x = args[0] if args else kwargs["input"]
            size = _arg(args, kwargs, 1, "output_size", None)
            out = avg(x, size)
            with_indices = bool(_arg(args, kwargs, 2, "return_indices", False)) or (
                "indices" in getattr(func, "__name__", ""))
            return (out, func(*args, **kwargs)[1]) if with_indices else out
        return func(*args, **kwargs)
