"""Receptive fields of a layer's units, measured exactly from the structure of the network."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._plumbing.device import PreparedModel, prepared
from ..errors import DissectError
from ..hooks.select import Selector
from ..hooks.tokens import TokensSpec
from ._common import Layer, one_layer, run_to_layer
from ._rules import SupportMode

log = logging.getLogger("dissect.deconvnet")

MAX_PROBE = 4096  # the largest input side tried before a field is called global


@dataclass(frozen=True)
class ReceptiveField:
    """Where in the input each position of a layer's maps looks.

    Position ``(i, j)`` of the layer depends on input rows ``offset[0] + i * stride[0]``
    up to (excluding) that plus ``size[0]``, and likewise for columns; boxes may reach
    outside the image (into the padding) unless clipped.

    Attributes
    ----------
    layer
        The layer name.
    input_size
        ``(H, W)`` of the inputs this field was measured for.
    map_size
        ``(h, w)`` of the layer's maps for that input size.
    size
        ``(rows, cols)`` of one position's field, unclipped (``input_size`` if global).
    stride
        Input pixels between neighbouring positions (the product of the strides on the way).
    offset
        Top-left input pixel of position ``(0, 0)``'s field (negative: it starts in the
        padding).
    is_global
        Every position depends on the whole input (global pooling, attention, a field larger
        than the probes, a non-spatial layer, or a geometry that is not a regular grid).
    """

    layer: str
    input_size: tuple[int, int]
    map_size: tuple[int, int]
    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    is_global: bool = False

    def box(self, i: int, j: int, *, clip: bool = True) -> tuple[int, int, int, int]:
        """Input box ``(y0, y1, x0, x1)`` (end-exclusive) of position ``(i, j)``.

        Parameters
        ----------
        i, j
            A position of the layer's maps.
        clip
            Clip the box to the image (``False``: it may extend into the padding).
        """
        height, width = self.input_size
        if self.is_global:
            return 0, height, 0, width
        y0 = self.offset[0] + i * self.stride[0]
        x0 = self.offset[1] + j * self.stride[1]
        y1, x1 = y0 + self.size[0], x0 + self.size[1]
        if clip:
            y0, x0 = max(y0, 0), max(x0, 0)
            y1, x1 = min(y1, height), min(x1, width)
        return y0, y1, x0, x1

    def window(self, i: int, j: int) -> tuple[int, int, int, int]:
        """A box of one fixed shape for every position, inside the image, holding the field.

        Its shape is ``min(size, input_size)``; at the image border it is shifted inward, so
        patches of one layer all have the same shape without padding.
        """
        height, width = self.input_size
        if self.is_global:
            return 0, height, 0, width
        wh, ww = min(self.size[0], height), min(self.size[1], width)
        y0, _, x0, _ = self.box(i, j, clip=False)
        y0 = min(max(y0, 0), height - wh)
        x0 = min(max(x0, 0), width - ww)
        return y0, y0 + wh, x0, x0 + ww

    def crop(self, i: int, j: int) -> tuple[int, int, int, int]:
        """The smallest input box on which position ``(i, j)`` can be computed exactly.

        It holds the clipped field and starts at a multiple of the stride, so the grid of
        every layer on the way stays aligned with the full input's; a field that reaches the
        image border keeps the border (and so the network's own padding).
        """
        height, width = self.input_size
        if self.is_global:
            return 0, height, 0, width
        y0, y1, x0, x1 = self.box(i, j, clip=True)
        return (y0 // self.stride[0]) * self.stride[0], y1, (x0 // self.stride[1]) * \
            self.stride[1], x1

    def __str__(self) -> str:
        if self.is_global:
            return f"{self.layer}: global (every unit sees the whole {self.input_size} input)"
        return (f"{self.layer}: {self.size[0]}x{self.size[1]} px, stride "
                f"{self.stride[0]}x{self.stride[1]}, offset {self.offset} "
                f"(maps {self.map_size[0]}x{self.map_size[1]} for {self.input_size} inputs)")


def _shape(input_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(input_size, numbers.Integral) and not isinstance(input_size, bool):
        input_size = (int(input_size), int(input_size))
    try:
        dims = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) == 2:
        dims = (3, *dims)
    if len(dims) != 3 or min(dims) < 1:
        raise DissectError(
            f"input_size must be S, (H, W) or (C, H, W) with positive sizes, got {input_size!r}")
    return dims  # type: ignore[return-value]


def _supports(model: nn.Module, layer: Layer, shape: tuple[int, int, int],
              placed: PreparedModel, where: Callable[[int, int], list[tuple[int, int]]],
              ) -> tuple[tuple[int, int], list[tuple[int, int, int, int] | None]]:
    """Map size, and the input box each position ``where(h, w)`` depends on (None: none)."""
    name = layer.name
    x = placed.inputs(torch.zeros((1, *shape))).requires_grad_(True)
    mode = SupportMode()
    out = run_to_layer(model, layer, x, mode)
    if mode.inexact:
        log.warning("receptive field of %r: %s kept as is; the field may be underestimated",
                    name, ", ".join(sorted(mode.inexact)))
    if out.ndim != 4:
        raise _NotSpatial(tuple(out.shape))
    if not out.requires_grad:
        raise DissectError(f"layer {name!r}'s output does not depend on the input")
    h, w = int(out.shape[2]), int(out.shape[3])
    positions = where(h, w)
    boxes: list[tuple[int, int, int, int] | None] = []
    with torch.autograd.set_detect_anomaly(False):
        for k, (i, j) in enumerate(positions):
            seed = torch.zeros_like(out)
            seed[0, :, min(i, h - 1), min(j, w - 1)] = float("nan")
            (grad,) = torch.autograd.grad(out, x, seed, retain_graph=k < len(positions) - 1)
            hit = grad[0].isnan().any(dim=0)
            rows, cols = hit.any(dim=1).nonzero()[:, 0], hit.any(dim=0).nonzero()[:, 0]
            if len(rows) == 0:
                boxes.append(None)
            else:
                boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    return (h, w), boxes


class _NotSpatial(Exception):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape)
        self.shape = shape


def _centre(h: int, w: int) -> list[tuple[int, int]]:
    return [(h // 2, w // 2), (h // 2 + 1, w // 2 + 1)]


def _fit(boxes: list, n: int, side: int, axis: int, centre: int) -> tuple[int, int, int] | None:
    """``(size, stride, offset)`` from the two centre boxes, None if they touch the border."""
    b0, b1 = boxes[0], boxes[1]
    if n < 2 or b0 is None or b1 is None:
        return None
    lo0, hi0 = b0[2 * axis], b0[2 * axis + 1]
    lo1, hi1 = b1[2 * axis], b1[2 * axis + 1]
    if lo0 <= 0 or hi1 >= side:
        return None
    return hi0 - lo0, lo1 - lo0, lo0 - centre * (lo1 - lo0)


def _grow(model: nn.Module, layer: Layer, shape: tuple[int, int, int],
          axis: int, placed: PreparedModel) -> tuple[int, int, int] | None:
    """Fit one axis on probes doubled along it until the field fits (None: global).

    A model that does not run on a larger probe (a Vision Transformer takes one input size:
    its position embeddings are fixed) gives None: at the input size, the field already
    reaches the border, and there is no larger input on which it could be told apart from
    the whole image.
    """
    probe = list(shape)
    last = -1
    while probe[1 + axis] < MAX_PROBE:
        probe[1 + axis] = min(2 * probe[1 + axis], MAX_PROBE)
        try:
            (h, w), boxes = _supports(model, layer, tuple(probe), placed, _centre)
        except _NotSpatial:
            return None
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - any refusal of the larger input size
            log.info("receptive field of %r: the model does not run on %s inputs (%s: %s); "
                     "its field, which reaches the border of %s inputs, is global",
                     layer.name, tuple(probe[1:]), type(exc).__name__, exc, tuple(shape[1:]))
            return None
        n = (h, w)[axis]
        if n == last:  # the maps do not grow with the input (adaptive pooling): global
            return None
        fit = _fit(boxes, n, probe[1 + axis], axis, n // 2)
        if fit is not None:
            return fit
        last = n
    return None


def receptive_field(
    model: nn.Module,
    layer: str,
    input_size: int | Sequence[int],
    *,
    device: str | torch.device | None = None,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> ReceptiveField:
    """Measure the receptive field of a layer's positions, exactly, from the network itself.

    Method: with every rectifier and activation made the identity and max-pooling made
    average pooling (so no data-dependent switch can hide a path), a NaN is sent backwards
    from one position at every channel; NaN survives multiplication by any weight, zero
    included, so the input pixels it reaches are exactly those the position structurally
    depends on. Two neighbouring positions give the size, stride and offset along each axis;
    along an axis where the field reaches the probe's border, the probe is grown (up to
    4096 px, that axis only) until it does not. The fit is then checked at the real input
    size on the first and last positions; a network whose fields are not a regular grid,
    or depend on the whole input, is reported as ``is_global``.

    A Vision Transformer's token layers are read as maps of their patch grid (``tokens=``).
    Up to its first attention, a token depends on its own patch only (a field of one patch,
    the patch size as stride); from the first attention on, every token depends on every
    pixel and the field is global. A model that takes one input size only cannot be probed
    larger: a field that reaches the border at the input size is then reported global.

    Parameters
    ----------
    model
        The network (run in eval mode; modes restored).
    layer
        The layer name.
    input_size
        ``S``, ``(H, W)`` or ``(C, H, W)`` of the model's inputs (3 channels unless given).
    device
        Where to compute (as in :func:`reconstruct`).
    tokens, select
        How the layer's output is read (token grids, which tensor of several), as in
        :func:`reconstruct`.

    Returns
    -------
    ReceptiveField

    Examples
    --------
    >>> import torchvision
    >>> receptive_field(torchvision.models.resnet18(), "layer2", 224).size
    (99, 99)
    """
    shape = _shape(input_size)
    target = one_layer(model, layer, tokens, select)
    name = target.name
    size = (shape[1], shape[2])
    with prepared(model, device) as run:
        model = run.module
        try:
            (h, w), boxes = _supports(
                model, target, shape, run,
                lambda h, w: _centre(h, w) + [(0, 0), (h - 1, w - 1)])
        except _NotSpatial as exc:
            log.info("layer %r has outputs of shape %s (no 2-D maps): its field is global",
                     name, exc.shape)
            return ReceptiveField(name, size, (1, 1), size, size, (0, 0), True)
        global_field = ReceptiveField(name, size, (h, w), size, size, (0, 0), True)
        fits = []
        for axis in (0, 1):
            n = (h, w)[axis]
            fit = _fit(boxes, n, size[axis], axis, n // 2)
            if fit is None:
                fit = _grow(model, target, shape, axis, run)
            if fit is None or fit[1] < 1:
                return global_field
            fits.append(fit)
    field = ReceptiveField(
        name, size, (h, w), (fits[0][0], fits[1][0]), (fits[0][1], fits[1][1]),
        (fits[0][2], fits[1][2]))
    for (i, j), got in zip([(0, 0), (h - 1, w - 1)], boxes[2:], strict=True):
        if got != field.box(i, j):
            log.warning(
                "receptive field of %r: position %s depends on input box %s, not %s as the "
                "regular grid %s predicts; treating the field as global", name, (i, j), got,
                field.box(i, j), field)
            return global_field
    return field
