""":func:`ablate` and :func:`ablate_concept`: remove units of a layer, measure every class."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._plumbing.checks import one_of, positive_int, unit_list, units_in_range
from .._plumbing.device import Device, PreparedModel, prepare_model
from .._plumbing.progress import progress_bar
from ..datasets.sources import resolve_data
from ..errors import DataError, DissectError
from ..hooks.layers import resolve_layers
from ..hooks.select import Selector
from ..hooks.source import BatchSource
from ..hooks.tokens import TokensSpec
from ..hooks.trace import Trace
from .engine import Ablator, ClassTally, check_targets
from .result import METRICS, MODES, AblationResult

__all__ = ["ablate", "ablate_concept"]

log = logging.getLogger(__name__)


def ablate(
    model: nn.Module | PreparedModel,
    data: Any,
    layer: str,
    units: int | Sequence[int] | torch.Tensor | None = None,
    *,
    targets: Any = None,
    metric: str = "accuracy",
    mode: str = "zero",
    keep: bool = False,
    classes: Sequence[int] | None = None,
    batch_size: int = 64,
    device: Device = None,
    progress: bool = True,
    tokens: TokensSpec = "auto",
    select: Selector | None = None,
) -> AblationResult:
    """Remove units of a layer, one at a time (or all but a few), and measure each class.

    Bau et al. (PNAS 2020, "Understanding the role of individual units in a deep neural
    network"): a unit that Network Dissection labels is *used* by the network when removing it
    changes the output. For each unit, the data runs with that channel of ``layer`` replaced
    (by 0, or by its dataset mean), and the metric of every class is compared with the
    unablated model's.

    Parameters
    ----------
    model
        The model (or a :class:`~dissect.PreparedModel`); it returns ``(batch, classes)``
        logits (or a tuple/dict whose first tensor is). Run in eval mode, where the device
        policy puts it (:func:`dissect.prepare_model`).
    data
        A map-style dataset, a ``DataLoader`` (``shuffle=False``) or an ``(N, ...)`` tensor;
        items as everywhere (a tensor, ``(input, ...)`` or ``{"image": ...}``). Or a
        data-source spec as the CLI's ``--data`` (``"synthetic:N"``, ``"samples"``,
        ``"broden:PATH"``, a folder; :func:`dissect.datasets.resolve_data`), opened without a
        transform: pass a dataset built with the model's preprocessing when it needs one.
    layer
        The layer whose units are removed: a unit is a channel of its ``(B, C, ...)`` output
        (a hidden dimension of a token layer read as a map: the patch tokens are edited, the
        class and register tokens are not).
    units
        The units: ``None`` (default) every channel, one row each; or a list. With
        ``keep=True``, the units that are kept.
    targets
        One class index per sample, in the data's order; ``None``: each sample's class is the
        unablated model's prediction (then the baseline accuracy of every class is 1).
    metric
        Measured per class over the samples of the class: ``"accuracy"`` the fraction
        predicted as the class; ``"logit"`` the mean of the class's own logit;
        ``"probability"`` the mean of its softmax probability.
    mode
        ``"zero"`` sets a removed unit to 0; ``"mean"`` to its mean over the whole dataset and
        every position (one value per unit, from a first pass up to the layer:
        ``result.means``).
    keep
        Keep only ``units`` and remove every other unit of the layer, all at once (Bau et al.'s
        "20 units suffice"): the result has one row.
    classes
        The classes to report: ``None`` (default) those with at least one sample (among
        ``targets``, or the unablated predictions); or a list of model outputs, where a class
        without samples gets NaN (never 0).
    batch_size
        Samples per batch (the forward passes hold several copies of a batch).
    device
        Where to run (:func:`dissect.prepare_model`).
    progress
        Show a progress bar.
    tokens, select
        How the layer's output is read (as for :class:`~dissect.hooks.Trace`).

    Returns
    -------
    AblationResult
        ``.units``, ``.classes``, ``.baseline`` ``(n_classes,)``, ``.ablated`` ``(rows,
        n_classes)`` (``rows = len(units)``, or 1 with ``keep=True``), ``.drop = baseline -
        ablated``, ``.top(unit, k)``, ``summary()``, ``to_json``/``from_json``/``to_csv``.

    Notes
    -----
    **Exact and fast.** A batch runs once up to the end of the layer; then several copies of
    it at once run only the rest of the network, copy ``i`` with its units removed (as many
    copies per pass as about 1 GiB holds, half the free memory on CUDA; halved when CUDA runs
    out). Cutting a forward pass that is arbitrary Python works by standing in for the modules
    that ran before (:mod:`dissect.ablation.prefix`: their ``forward`` is replaced inside a
    ``with`` block, always restored). The first batch checks that this reproduces the model's
    output; where it does not (or the layer runs more than once per forward pass, when every
    call is edited) full forward passes run instead, with a warning: the same numbers, slower.
    ``result.settings["engine"]`` says which ran. Model code that reads the layer's input
    again after the layer (a skip connection) is run as it is, so it sees the values it
    would.

    Examples
    --------
    >>> res = ablate(model, dataset, "layer4", targets=labels)       # doctest: +SKIP
    >>> res.top(unit=17, k=3)            # the three classes unit 17 matters most for
    >>> ablate(model, dataset, "layer4", [3, 17, 40], keep=True)     # doctest: +SKIP
    """
    one_of(metric, "metric", METRICS)
    one_of(mode, "mode", MODES)
    if not isinstance(keep, bool):
        raise DissectError(f"keep must be True or False, got {keep!r}")
    chosen = None if units is None else unit_list(units)
    if keep:
        if chosen is None:
            raise DissectError("keep=True keeps the units you list and removes the others: "
                               "pass units=[...]")
        return _run(model, data, layer, sorted(set(chosen)), "keep", targets=targets,
                    metric=metric, mode=mode, classes=classes, batch_size=batch_size,
                    device=device, progress=progress, tokens=tokens, select=select)
    if chosen is not None and len(set(chosen)) != len(chosen):
        twice = sorted({u for u in chosen if chosen.count(u) > 1})
        raise DissectError(f"units lists {twice[:5]} more than once: each unit is one row")
    return _run(model, data, layer, chosen, "each", targets=targets, metric=metric, mode=mode,
                classes=classes, batch_size=batch_size, device=device, progress=progress,
                tokens=tokens, select=select)


def ablate_concept(
    result: Any,
    model: nn.Module | PreparedModel,
    data: Any,
    concept: str,
    *,
    layer: str | None = None,
    targets: Any = None,
    metric: str = "accuracy",
    mode: str = "zero",
    classes: Sequence[int] | None = None,
    batch_size: int = 64,
    device: Device = None,
    progress: bool = True,
    tokens: TokensSpec = "auto",
    select: Selector | None = None,
) -> AblationResult:
    """Remove every detector of a concept at once and measure each class.

    Parameters
    ----------
    result
        A :class:`~dissect.netdissect.DissectionResult` of this model (from
        :func:`dissect.dissect_units`).
    model, data
        As for :func:`ablate`.
    concept
        A concept name (``UnitResult.concept``): the units whose best concept it is and whose
        IoU passes the threshold (``is_detector``) are removed, together.
    layer
        The dissected layer to use; ``None``: the one layer that has detectors of ``concept``
        (an error when several have).
    targets, metric, mode, classes, batch_size, device, progress, tokens, select
        As for :func:`ablate`.

    Returns
    -------
    AblationResult
        One row (``removal="set"``): ``.units`` are the detectors removed, ``.ablated`` is
        ``(1, n_classes)``; ``settings["concept"]`` names the concept.

    Raises
    ------
    DissectError
        When no unit detects the concept (the message lists the concepts that have
        detectors), or several layers have detectors and ``layer`` is not given.
    """
    if not (hasattr(result, "layers") and callable(getattr(result, "units", None))):
        raise DissectError("result must be a DissectionResult (from dissect.dissect_units), got "
                           f"{type(result).__name__}")
    if not isinstance(concept, str):
        raise DissectError(f"concept must be a concept name, got {concept!r}")
    if layer is not None and layer not in result.layers:
        raise DissectError(f"layer {layer!r} was not dissected; layers: {result.layers}")
    layers = list(result.layers) if layer is None else [layer]
    detectors = {name: [u for u in result.units(name) if u.is_detector] for name in layers}
    hits = {name: sorted(u.unit for u in found if u.concept == concept)
            for name, found in detectors.items()}
    hits = {name: units for name, units in hits.items() if units}
    if not hits:
        known = sorted({u.concept for found in detectors.values() for u in found})
        raise DissectError(
            f"no unit of {layers} detects {concept!r}, so there is nothing to remove; "
            f"concepts with detectors: {known[:30] or 'none'}")
    if len(hits) > 1:
        raise DissectError(f"{concept!r} has detectors in several layers ({list(hits)}): "
                           "pass layer= to say which to ablate")
    (name, units), = hits.items()
    return _run(model, data, name, units, "set", targets=targets, metric=metric, mode=mode,
                classes=classes, batch_size=batch_size, device=device, progress=progress,
                tokens=tokens, select=select, extra={"concept": concept})


# --------------------------------------------------------------------------- the run


def _class_list(classes: Any) -> np.ndarray:
    try:
        values = list(classes)
    except TypeError:
        raise DissectError(f"classes must be a list of class indices, got "
                           f"{type(classes).__name__}") from None
    if not values or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0
                         for c in values):
        raise DissectError(f"classes must be a non-empty list of class indices >= 0, got "
                           f"{values[:5]!r}")
    if len(set(values)) != len(values):
        raise DissectError("classes lists a class more than once")
    return np.asarray(values, dtype=np.int64)


def _rows(units: list[int], removal: str, channels: int, device: torch.device
          ) -> list[torch.Tensor | None]:
    """The units each row removes (index tensors)."""
    def index(values: list[int]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long, device=device)

    if removal == "each":
        return [index([u]) for u in units]
    if removal == "keep":
        kept = set(units)
        return [index([c for c in range(channels) if c not in kept])]
    return [index(units)]


def _means(run: PreparedModel, source: BatchSource, layer: str, tokens: Any, select: Any,
           progress: bool) -> np.ndarray:
    """Each unit's mean over the data and every position (one pass up to the layer)."""
    total: torch.Tensor | None = None
    count = 0

    def record(name: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        if t.ndim < 2:
            raise DissectError(f"layer {name!r} gives {tuple(t.shape)}: ablate needs a "
                               "(batch, units, ...) output")
        wide = t.float() if t.device.type == "mps" else t.to(torch.float64)
        return wide.sum(dim=[0, *range(2, t.ndim)]).cpu().double(), t.numel() // t.shape[1]

    with progress_bar(total=source.n, desc=f"mean of {layer}", enabled=progress,
                      unit="img") as bar:
        for xb, _ in source.batches(0):
            x = run.inputs(xb)
            with Trace(run.module, [layer], stop=True, record=record, tokens=tokens,
                       select=select) as tr:
                run.module(x)
            if layer not in tr.outputs:
                raise DissectError(f"layer {layer!r} did not run in the forward pass: choose a "
                                   "layer the model's forward calls")
            s, c = tr.outputs[layer]
            total = s if total is None else total + s
            count += c
            bar.update(len(x))
    assert total is not None  # a BatchSource is never empty
    return (total / count).numpy()


def _run(model: Any, data: Any, layer: str, units: list[int] | None, removal: str, *,
         targets: Any, metric: str, mode: str, classes: Any, batch_size: int, device: Device,
         progress: bool, tokens: Any, select: Any,
         extra: dict[str, Any] | None = None) -> AblationResult:
    batch_size = positive_int(batch_size, "batch_size")
    data, _ = resolve_data(data)
    run = prepare_model(model, device)
    module = run.module
    if not isinstance(layer, str):
        raise DissectError(f"layer must be one layer name, got {layer!r}")
    resolve_layers(module, layer)
    wanted = None if classes is None else _class_list(classes)
    source = BatchSource(data, batch_size, 0, run.device)
    labels = check_targets(targets, source.n)
    with run.evaluating(), torch.inference_mode():
        means = _means(run, source, layer, tokens, select, progress) if mode == "mean" else None
        fill = None if means is None else torch.as_tensor(
            means, dtype=run.dtype or torch.float32, device=run.device)
        ablator = Ablator(module, layer, tokens, select)
        tally: ClassTally | None = None
        copies: list[torch.Tensor | None] = []
        k, row = 1, 0
        with progress_bar(total=source.n, desc=f"ablate {layer}", enabled=progress,
                          unit="img", outer=True) as bar:
            for xb, _ in source.batches(0):
                x = run.inputs(xb)
                b = len(x)
                if tally is None:
                    kept = ablator.start(x)
                    channels = ablator.shape[1]
                    if units is None:
                        units = list(range(channels))
                    units_in_range(units, channels, layer)
                    copies = [None, *_rows(units, removal, channels, run.device)]
                    tally = ClassTally(len(copies), ablator.n_outputs, metric)
                    _check_labels(labels, ablator.n_outputs)
                    k = ablator.copies_per_pass(x, len(copies))
                    if ablator.reason is not None:
                        log.warning("ablate %r: %s; running full forward passes instead "
                                    "(exact, slower)", layer, ablator.reason)
                else:
                    kept = ablator.prefix(x)
                t = None if labels is None else torch.as_tensor(labels[row:row + b],
                                                                 device=x.device)
                k = _batch(ablator, tally, x, kept, copies, fill, t, k)
                row += b
                bar.update(b)
    assert tally is not None and units is not None
    chosen = np.flatnonzero(tally.counts.numpy() > 0) if wanted is None else wanted
    if wanted is not None and (wanted >= ablator.n_outputs).any():
        raise DissectError(f"classes lists {int(wanted.max())}, but the model has "
                           f"{ablator.n_outputs} outputs")
    counts, values = tally.means(chosen)
    settings = {
        "n_samples": source.n, "targets": "predicted" if labels is None else "given",
        "classes": "present" if wanted is None else "given", "n_outputs": ablator.n_outputs,
        "engine": "prefix" if ablator.plan is not None else "full",
        "fallback": ablator.reason, "copies_per_pass": k, "batch_size": batch_size,
        "device": str(run.device), "layer_shape": list(ablator.shape[1:]), **(extra or {})}
    return AblationResult(layer, units, chosen, counts, values[0], values[1:], metric=metric,
                          mode=mode, removal=removal, means=means, settings=settings)


def _check_labels(labels: np.ndarray | None, n_outputs: int) -> None:
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= n_outputs):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise DataError(f"targets holds class {bad}, but the model has {n_outputs} outputs "
                        f"(classes 0..{n_outputs - 1})")


def _batch(ablator: Ablator, tally: ClassTally, x: torch.Tensor, kept: Any,
           copies: list[torch.Tensor | None], fill: torch.Tensor | None,
           t: torch.Tensor | None, k: int) -> int:
    """Every copy of one batch, ``k`` per pass (halved when CUDA runs out of memory); the
    ``k`` that worked."""
    start = 0
    while start < len(copies):
        chunk = copies[start:start + k]
        try:
            logits = ablator.forward(x, kept, chunk, fill)
        except torch.cuda.OutOfMemoryError:
            if k == 1:
                raise
            k = max(1, k // 2)
            log.info("out of memory: %d copies of the batch per pass from now on", k)
            continue
        if t is None:  # copy 0 of the first pass is the unablated model
            t = logits[: len(x)].argmax(dim=1)
        if start == 0:
            tally.count(t)
        tally.add(start, logits, t)
        start += len(chunk)
    return k
