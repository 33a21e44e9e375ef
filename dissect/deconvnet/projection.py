"""Project units of a hidden layer back to input space: deconvnet, guided backprop, gradient."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from .._plumbing.checks import batched_input, optional_positive_int, unit_list, units_in_range
from .._plumbing.chunks import row_chunks
from .._plumbing.device import prepared
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from ..hooks.select import Selector
from ..hooks.tokens import TokensSpec
from ._common import Layer, check_method, one_layer, run_to_layer
from ._rules import RectifierRules, report_others

log = logging.getLogger("dissect.deconvnet")

Location = str | tuple[int, ...]


def rules(method: str) -> RectifierRules | None:
    """The scoped mode that implements ``method`` (``None`` for the plain gradient)."""
    return None if method == "gradient" else RectifierRules(method)


def check_location(location: Location, spatial: tuple[int, ...], layer: str) -> Location:
    """Validate ``location`` against a layer's spatial shape; return it normalized."""
    if isinstance(location, str):
        if location in ("max", "all"):
            return location
        raise DissectError(f"location must be 'max', 'all' or a position tuple, got {location!r}")
    try:
        pos = tuple(int(v) for v in location)
    except (TypeError, ValueError):
        raise DissectError(
            f"location must be 'max', 'all' or a position tuple such as (3, 5), got "
            f"{location!r}") from None
    if len(pos) != len(spatial):
        raise DissectError(
            f"location {location!r} has {len(pos)} coordinates but layer {layer!r} has "
            f"{len(spatial)} spatial dims (maps of shape {tuple(spatial)})"
        )
    if any(not 0 <= p < s for p, s in zip(pos, spatial, strict=True)):
        raise DissectError(
            f"location {pos} is outside layer {layer!r}'s maps of shape {tuple(spatial)}")
    return pos


def argmax_positions(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and flat position of each map's maximum (the first one on ties).

    Parameters
    ----------
    maps
        ``(N, *spatial)``; with no spatial dims every entry is its own maximum.

    Returns
    -------
    values : torch.Tensor
        ``(N,)``.
    flat : torch.Tensor
        ``(N,)`` int64 index into the flattened spatial dims (0 without spatial dims).
    """
    flat = maps.reshape(maps.shape[0], -1)
    values, index = flat.max(dim=1)
    return values, index


def spike_signal(out: torch.Tensor, units: torch.Tensor, location: Location,
                 flat: torch.Tensor | None = None) -> torch.Tensor:
    """The top signal: each row's unit kept (its max, whole map or one position), rest zero.

    Parameters
    ----------
    out
        ``(N, C, *spatial)`` layer output.
    units
        ``(N,)`` int64 unit of each row.
    location
        ``"max"``, ``"all"`` or a position tuple.
    flat
        ``(N,)`` flat spatial positions to use instead of ``location`` (each row its own).

    Returns
    -------
    torch.Tensor
        Shaped like ``out``, detached.
    """
    values = out.detach()
    n = values.shape[0]
    rows = torch.arange(n, device=values.device)
    units = units.to(values.device)
    maps = values[rows, units].reshape(n, -1)  # (N, S)
    signal = torch.zeros_like(values)
    view = signal.view(n, values.shape[1], -1)
    if location == "all" and flat is None:
        view[rows, units] = maps
        return signal
    if flat is None:
        if location == "max":
            _, flat = argmax_positions(maps)
        else:
            spatial = values.shape[2:]
            index = 0
            for p, s in zip(location, spatial, strict=True):
                index = index * s + p
            flat = torch.full((n,), index, dtype=torch.int64, device=values.device)
    flat = flat.to(values.device)
    view[rows, units, flat] = maps[rows, flat]
    return signal


def backproject(model: nn.Module, layer: Layer, x: torch.Tensor, method: str, signals: list,
                others: Counter | None = None) -> list[torch.Tensor]:
    """One forward pass of ``x`` to the layer, then one backward pass per signal.

    Parameters
    ----------
    signals
        Callables ``out -> grad_output`` (one backward pass each, over the same graph);
        ``out`` is the layer's output as a map (:meth:`Layer.read`).

    Returns
    -------
    list of torch.Tensor
        The input-space projection of each signal, shaped like ``x``.

    Raises
    ------
    DissectError
        For ``"deconvnet"`` or ``"guided"`` on a network without rectifiers up to the layer
        (:meth:`~dissect.deconvnet.RectifierRules.check`).
    """
    xs = x.detach().clone().requires_grad_(True)
    mode = rules(method)
    out = run_to_layer(model, layer, xs, mode)
    if mode is not None:
        mode.check(layer.name)
        if others is not None:
            others.update(mode.others)
    if not out.requires_grad:
        raise DissectError(
            f"layer {layer.name!r}'s output does not depend on the input through a "
            "differentiable path, so nothing can be projected back"
        )
    results = []
    for k, make in enumerate(signals):
        (grad,) = torch.autograd.grad(out, xs, make(out), retain_graph=k < len(signals) - 1)
        results.append(grad)
    return results


def layer_output(model: nn.Module, layer: Layer, x: torch.Tensor,
                 method: str | None = None) -> torch.Tensor:
    """The layer's output (a map) for ``x`` without gradients (the forward stops at the layer).

    With ``method``, the pass also checks that the method's rule applies to the network
    (:meth:`~dissect.deconvnet.RectifierRules.check`), before any projection is computed.
    """
    mode = None if method is None else rules(method)
    with torch.no_grad():
        out = run_to_layer(model, layer, x, mode)
    if mode is not None:
        mode.check(layer.name)
    return out


def reconstruct(
    model: nn.Module,
    x: torch.Tensor,
    layer: str,
    units: int | Sequence[int] | torch.Tensor,
    *,
    method: str = "deconvnet",
    location: Location = "max",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> torch.Tensor:
    """Project units of a hidden layer back to input space (Zeiler & Fergus's deconvnet).

    For each input and unit, the layer's output is replaced by a *top signal* that keeps only
    that unit (``location``) and zeroes everything else, and the signal is sent back to the
    input through the network's transposed operations. All units share one forward pass per
    batch of inputs (one backward pass each over the retained graph); the forward pass stops
    at the layer.

    Parameters
    ----------
    model
        The network; it runs in eval mode (every module's mode is restored afterwards) and is
        moved to ``device``. Parameter ``.grad`` fields are never touched.
    x
        ``(B, C, H, W)`` (or any ``(B, ...)``) model inputs, e.g. normalized images.
    layer
        A layer name of ``model.named_modules()`` (see :func:`dissect.hooks.layer_names`).
        A module called several times in one forward pass is taken at its first call.
    units
        Unit (channel) indices of the layer, e.g. ``[0, 5, 7]`` or ``range(16)``. For a
        token layer (a Vision Transformer block), the hidden dimensions.
    method
        ``"deconvnet"`` (Zeiler & Fergus 2014): max-pooling is undone with the forward pass's
        switches (the arg-max positions), every rectifier passes ``relu(signal)`` backwards
        ignoring the forward pass, convolutions (and BatchNorm, an affine map in eval mode)
        are undone with their transposes, residual sums fan the signal out to both branches.
        ``"guided"`` (guided backprop, Springenberg et al. 2015): rectifiers pass
        ``relu(signal) * (forward input in the linear range)``. ``"gradient"``: the plain
        gradient of the same top signal (what autograd computes). The two rules are defined
        for ReLU networks: a network with no rectifier before the layer (GELU, SiLU,
        attention: a Vision Transformer) is refused, use ``"gradient"`` there (Notes).
    location
        ``"max"``: the unit's maximal activation (its value, at its first arg-max position);
        ``"all"``: the unit's whole map; ``(i, j)``: the unit's value at that position. For a
        token layer, positions of its patch grid (row ``i``, column ``j``; prefix tokens such
        as the class token are not part of the map).
    batch_size
        Inputs per forward pass (``None``: all at once). Memory holds one batch's graph.
    device
        Where to compute. ``None``: the model's device if it is on an accelerator, else CUDA
        when available, else the CPU. The model is moved there (and stays).
    progress
        Show a progress bar over backward passes when the call lasts more than a second.
    tokens
        How a transformer layer's ``(B, N, C)`` tokens are read as ``(B, C, h, w)`` maps:
        ``"auto"`` (recognized models: torchvision's and timm's ViTs, Swin; another 3-D
        output is an error saying how to pass a layout), a
        :class:`~dissect.hooks.TokenGrid`, ``None`` (the output as it is) or
        ``{layer: TokenGrid | None}``; as in :class:`dissect.hooks.Trace`.
    select
        Which tensor of a module returning several is the layer's output (index, key or
        callable; :mod:`dissect.hooks.select`), as in :class:`dissect.hooks.Trace`.

    Returns
    -------
    torch.Tensor
        ``(B, len(units), *x.shape[1:])`` on ``x``'s device: entry ``[b, k]`` is the
        projection of unit ``units[k]`` for input ``b``.

    Raises
    ------
    LayerNotFoundError
        For an unknown layer name (the message lists the closest valid ones).
    DissectError
        For an unknown method, a unit out of range or a bad location.

    Notes
    -----
    Which calls follow the rule: ``nn.ReLU`` (in place or not, also a module called twice),
    ``nn.ReLU6``, ``nn.Hardtanh(0, m)`` and the functional ``F.relu``, ``torch.relu``,
    ``Tensor.relu``, ``relu_``, ``F.relu6``, ``F.hardtanh(x, 0, m)`` inside ``forward``: a
    scoped ``TorchFunctionMode`` reroutes them while the forward pass runs and nothing
    else. ReLU6 (and ``hardtanh(0, m)``) is treated as the rectifier it contains: deconvnet
    passes ``relu(signal)`` (the upper clip is ignored, like the lower mask); guided passes
    ``relu(signal)`` only where ``0 < x < 6``, where its true gradient is 1. Other
    activations (LeakyReLU, ELU, GELU, SiLU, Hardswish, ...) keep their ordinary gradient
    under every method (as in captum), and so does attention (softmax); a warning names
    them. A network whose path to the layer has no rectifier at all but such activations
    (a GELU Vision Transformer, a SiLU network) is refused under ``"deconvnet"`` and
    ``"guided"``: the rule would apply nowhere and the result would be the plain gradient
    under another name. ``torch.clamp`` used as a ReLU,
    TorchScript and ``torch.compile``-d models are not rerouted. Multi-GPU ``DataParallel``
    replicas run in other threads, outside the mode: use one device.

    Examples
    --------
    >>> model, transform = load_model("mobilenet_v2-imagenet")            # doctest: +SKIP
    >>> proj = reconstruct(model, x, "features.7", range(8))              # doctest: +SKIP
    >>> proj.shape                                                        # doctest: +SKIP
    torch.Size([4, 8, 3, 224, 224])
    """
    x = batched_input(x)
    method = check_method(method)
    units = unit_list(units)
    target = one_layer(model, layer, tokens, select)
    name = target.name
    chunks = row_chunks(x.shape[0], optional_positive_int(batch_size, "batch_size"))
    others: Counter[str] = Counter()
    result: torch.Tensor | None = None
    with prepared(model, device) as run:
        model = run.module
        checked: Location | None = None
        bar = progress_bar(len(chunks) * len(units), f"{method} {name}", progress, unit="unit")
        with bar:
            for start, stop in chunks:
                xb = run.inputs(x[start:stop].detach())

                def signal(unit: int):
                    def make(out: torch.Tensor) -> torch.Tensor:
                        nonlocal checked
                        if checked is None:
                            units_in_range(units, out.shape[1], name)
                            checked = check_location(location, tuple(out.shape[2:]), name)
                        rows = torch.full((out.shape[0],), unit, dtype=torch.int64)
                        bar.update(1)
                        return spike_signal(out, rows, checked)
                    return make

                grads = backproject(model, target, xb, method, [signal(u) for u in units],
                                    others)
                block = torch.stack(grads, dim=1).to(x.device, x.dtype)
                if result is None:
                    result = torch.empty((x.shape[0],) + block.shape[1:], dtype=block.dtype,
                                         device=x.device)
                result[start:stop] = block
    report_others(others, method)
    assert result is not None
    return result
