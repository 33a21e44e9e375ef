"""Objectives: what an optimized image should excite, as small composable objects.

An :class:`Objective` maps the activations of one forward pass to **one value per image**
(shape ``(N,)``); :func:`~dissect.actmax.visualize` maximizes it. Leaf objectives read one
layer (or the model output); ``+``, ``-``, scalar ``*`` and ``/`` and unary ``-`` build new
ones, as in Lucid. A plain tuple ``("layer", unit)`` means :func:`channel`.

The activations are a mapping ``{layer name: tensor}`` with the model output under the key
:data:`OUTPUT` (``""``, the name of the root module in ``model.named_modules()``). A
transformer layer's tokens arrive as ``(N, C, h, w)`` maps of its patch grid
(:class:`dissect.hooks.TokenGrid`; the prefix tokens, such as the class token, set aside),
so every objective reads a Vision Transformer block as it reads a convolution: a unit is a
hidden dimension, a position is a patch.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import DissectError

OUTPUT = ""
"""Key of the model output in the activation mapping (the root module's name)."""

Activations = Mapping[str, torch.Tensor]
ObjectiveLike = Any  # Objective | tuple[str, int]


class Objective:
    """A differentiable score of each image, computed from layer activations.

    Parameters
    ----------
    fn
        ``activations -> (N,) tensor``: one value per row of the activations.
    layers
        The layer names ``fn`` reads (:data:`OUTPUT` for the model output).
    name
        A short description (``"features.10:3"``), shown in logs and as grid labels.
    unit
        ``(layer, channel)`` when the objective is exactly one channel's mean
        (:func:`channel`), so results can be filed per unit; ``None`` otherwise.

    Examples
    --------
    >>> import torch
    >>> acts = torch.ones(2, 16, 4, 4)   # (N, C, H, W) activations of the layer
    >>> obj = channel("features.10", 3) - 0.5 * channel("features.10", 7)
    >>> obj({"features.10": acts})       # (N,) values
    tensor([0.5000, 0.5000])
    """

    __slots__ = ("_fn", "layers", "name", "unit")

    def __init__(self, fn: Callable[[Activations], torch.Tensor], layers: Iterable[str],
                 name: str, unit: tuple[str, int] | None = None) -> None:
        self._fn = fn
        self.layers: tuple[str, ...] = tuple(dict.fromkeys(layers))
        self.name = name
        self.unit = unit

    def __call__(self, activations: Activations) -> torch.Tensor:
        """Evaluate on activations with ``N`` rows; returns ``(N,)`` values."""
        return self._fn(activations)

    @property
    def needs_output(self) -> bool:
        """Whether the model output (not only hidden layers) is read."""
        return OUTPUT in self.layers

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: Any) -> Objective:
        if _is_number(other):
            c = float(other)
            return Objective(lambda a: self(a) + c, self.layers, f"{self.name} + {c:g}")
        rhs = _coerce(other)
        if rhs is None:
            return NotImplemented
        return Objective(lambda a: self(a) + rhs(a), self.layers + rhs.layers,
                         f"{self.name} + {rhs.name}")

    def __radd__(self, other: Any) -> Objective:
        if _is_number(other) and other == 0:  # sum([...]) starts from 0
            return self
        if _is_number(other):
            return self + other
        lhs = _coerce(other)
        return NotImplemented if lhs is None else lhs + self

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), self.layers, f"-({self.name})")

    def __sub__(self, other: Any) -> Objective:
        if _is_number(other):
            return self + (-float(other))
        rhs = _coerce(other)
        return NotImplemented if rhs is None else self + (-rhs)

    def __rsub__(self, other: Any) -> Objective:
        if _is_number(other):
            return (-self) + float(other)
        lhs = _coerce(other)
        return NotImplemented if lhs is None else lhs + (-self)

    def __mul__(self, other: Any) -> Objective:
        if not _is_number(other):
            return NotImplemented  # objectives scale by numbers only (as in lucent)
        c = float(other)
        return Objective(lambda a: c * self(a), self.layers, f"{c:g} * ({self.name})")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Objective:
        if not _is_number(other):
            return NotImplemented
        if float(other) == 0:
            raise DissectError("cannot divide an objective by zero")
        return self * (1.0 / float(other))


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _coerce(x: Any) -> Objective | None:
    if isinstance(x, Objective):
        return x
    if _is_unit_tuple(x):
        return channel(x[0], x[1])
    return None


def _is_unit_tuple(x: Any) -> bool:
    return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
            and isinstance(x[1], numbers.Integral) and not isinstance(x[1], bool))


def as_objective(obj: ObjectiveLike) -> Objective:
    """Turn ``("layer", unit)`` into :func:`channel`; return an :class:`Objective` as it is.

    Raises
    ------
    DissectError
        For anything else.
    """
    result = _coerce(obj)
    if result is None:
        raise DissectError(
            f"an objective must be a (layer, unit) tuple or a dissect.actmax objective "
            f"(channel, neuron, logit, direction), not {type(obj).__name__} {obj!r:.60}"
        )
    return result


def as_objectives(objectives: ObjectiveLike | Sequence[ObjectiveLike]) -> list[Objective]:
    """One objective or a sequence of them, as a non-empty list of :class:`Objective`."""
    if isinstance(objectives, Objective) or _is_unit_tuple(objectives):
        return [as_objective(objectives)]
    if isinstance(objectives, (str, bytes)) or not isinstance(objectives, Iterable):
        raise DissectError(
            f"objectives must be an objective, a (layer, unit) tuple or a list of them, not "
            f"{type(objectives).__name__} {objectives!r:.60}"
        )
    result = [as_objective(o) for o in objectives]
    if not result:
        raise DissectError("no objectives given: pass at least one, e.g. [('features.10', 0)]")
    return result


# ---------------------------------------------------------------------- leaf objectives


def _check_unit(unit: Any, what: str = "unit") -> int:
    if isinstance(unit, bool) or not isinstance(unit, numbers.Integral) or unit < 0:
        raise DissectError(f"{what} must be a non-negative integer, got {unit!r}")
    return int(unit)


def _layer_tensor(acts: Activations, layer: str) -> torch.Tensor:
    try:
        t = acts[layer]
    except KeyError:
        raise DissectError(
            f"no activations of layer {layer!r} were recorded (have {sorted(acts)})"
        ) from None
    if t.ndim < 2:
        raise DissectError(f"layer {layer!r} has output shape {tuple(t.shape)}: need (N, C, ...)")
    return t


def _unit_of(acts: Activations, layer: str, unit: int, what: str = "unit") -> torch.Tensor:
    t = _layer_tensor(acts, layer)
    channels = t.shape[1]
    if unit >= channels:
        where = "the model output" if layer == OUTPUT else f"layer {layer!r}"
        raise DissectError(
            f"{what} {unit} is out of range for {where}, which has {channels} "
            f"{'outputs' if layer == OUTPUT else 'channels'} (0-{channels - 1})"
        )
    return t[:, unit]


def channel(layer: str, unit: int) -> Objective:
    """Mean activation of one channel over all positions (Lucid's ``channel``).

    Parameters
    ----------
    layer
        Dotted layer name (see :func:`dissect.hooks.layer_names`).
    unit
        Channel index; for a layer with ``(N, C)`` outputs (``Linear``), the unit itself; for
        a token layer (a Vision Transformer block), hidden dimension ``unit`` averaged over
        the patch tokens (not the class or other prefix tokens).

    Returns
    -------
    Objective
    """
    if not isinstance(layer, str):
        raise DissectError(f"layer must be a layer name (str), got {type(layer).__name__}")
    unit = _check_unit(unit)

    def fn(acts: Activations) -> torch.Tensor:
        u = _unit_of(acts, layer, unit)
        return u if u.ndim == 1 else u.flatten(1).mean(1)

    return Objective(fn, [layer], f"{layer}:{unit}", unit=(layer, unit))


def neuron(layer: str, unit: int, y: int | None = None, x: int | None = None) -> Objective:
    """Activation of one channel at one spatial position.

    Parameters
    ----------
    layer, unit
        As in :func:`channel`; the layer must have ``(N, C, H, W)`` outputs.
    y, x
        Row and column in the layer's activation map; ``None`` is the centre
        (``H // 2``, ``W // 2``). For a token layer, the patch in row ``y``, column ``x`` of
        its patch grid (token ``prefix + y * w + x``, the tokens being row-major). With
        size-changing transforms (``"standard"``) the map size varies from step to step, so
        the centre is the robust choice; an explicit index must be valid for every map size
        the transforms produce.

    Returns
    -------
    Objective
    """
    unit = _check_unit(unit)
    for name, v in (("y", y), ("x", x)):
        if v is not None:
            _check_unit(v, name)

    def fn(acts: Activations) -> torch.Tensor:
        u = _unit_of(acts, layer, unit)
        if u.ndim != 3:
            raise DissectError(
                f"neuron() needs a layer with (N, C, H, W) outputs; {layer!r} gives "
                f"{tuple(acts[layer].shape)}: use channel() instead"
            )
        h, w = u.shape[1:]
        yy, xx = (h // 2 if y is None else y), (w // 2 if x is None else x)
        if yy >= h or xx >= w:
            raise DissectError(
                f"neuron position (y={yy}, x={xx}) is outside layer {layer!r}'s {h}x{w} map "
                "(it shrinks with the transforms); use a smaller index or None for the centre"
            )
        return u[:, yy, xx]

    where = "centre" if y is None and x is None else f"y={y},x={x}"
    return Objective(fn, [layer], f"{layer}:{unit}@{where}")


def logit(class_index: int) -> Objective:
    """One output of the model (a class logit): needs the whole forward pass.

    Parameters
    ----------
    class_index
        Index into the model output ``(N, classes)``.

    Returns
    -------
    Objective
    """
    class_index = _check_unit(class_index, "class_index")

    def fn(acts: Activations) -> torch.Tensor:
        u = _unit_of(acts, OUTPUT, class_index, "class index")
        return u if u.ndim == 1 else u.flatten(1).mean(1)

    return Objective(fn, [OUTPUT], f"logit:{class_index}")


def direction(layer: str, vector: Any) -> Objective:
    """Dot product of the activation vector with ``vector``, averaged over positions (the
    patch tokens of a token layer).

    As Lucid's ``direction`` (``cossim_pow=0``): ``direction(layer, e_k)`` equals
    ``channel(layer, k)``. The vector is not normalized: pass a unit vector to make values
    comparable across directions.

    Parameters
    ----------
    layer
        Layer name.
    vector
        ``(C,)`` tensor or sequence, one weight per channel of the layer.

    Returns
    -------
    Objective
    """
    v = torch.as_tensor(vector, dtype=torch.float32).detach()
    if v.ndim != 1 or v.numel() == 0:
        raise DissectError(f"direction vector must be 1-D (C,), got shape {tuple(v.shape)}")

    def fn(acts: Activations) -> torch.Tensor:
        t = _layer_tensor(acts, layer)
        if t.shape[1] != v.numel():
            raise DissectError(
                f"direction vector has {v.numel()} entries but layer {layer!r} has "
                f"{t.shape[1]} channels"
            )
        w = v.to(device=t.device, dtype=t.dtype).view(1, -1, *([1] * (t.ndim - 2)))
        dot = (t * w).sum(1)
        return dot if dot.ndim == 1 else dot.flatten(1).mean(1)

    return Objective(fn, [layer], f"{layer}:direction")
