"""The optimization loops: activation maximization (:func:`visualize`), feature inversion
(:func:`invert`) and the plain evaluation of objectives on images (:func:`evaluate`)."""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

from .._plumbing.checks import optional_positive_int, positive_int
from .._plumbing.chunks import row_chunks
from .._plumbing.deprecation import renamed_kwargs
from .._plumbing.device import (
    PreparedModel,
    as_module,
    floating_dtype,
    model_devices,
    prepared,
    run_device,
)
from .._plumbing.progress import progress_bar
from ..errors import DissectError
from ..hooks import Trace, resolve_layers
from ..hooks.select import Selector
from ..hooks.tokens import TokensSpec
from ..hooks.trace import first_tensor
from .fastcopy import fast_copy
from .objectives import OUTPUT, Objective, ObjectiveLike, as_objectives
from .param import PARAMS, ImageParam
from .regularizers import RegularizerLike, TotalVariation, resolve_regularizers
from .result import ActmaxResult
from .transforms import TransformLike, apply_all, draw, resolve_transforms

log = logging.getLogger("dissect.actmax")

Normalizer = Any  # a callable on (N, 3, H, W) images in [0, 1], or a dissect.models.Preprocess
POSTFIX_EVERY = 16  # steps between progress-bar updates of the objective (a device sync)


# --------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _prepared(model: nn.Module | PreparedModel, device: str | torch.device | None,
              layers: Sequence[str]) -> Iterator[tuple[nn.Module, torch.device]]:
    """The model to run (a fast eval-mode copy, see :mod:`.fastcopy`) and the inputs' device.

    The copy is placed by the device policy (:func:`dissect.prepare_model`) without touching
    the caller's model: where the model is, or on ``device``; a copy of a model spread over
    several devices keeps its placement. Gradients are enabled inside, also under a caller's
    ``no_grad`` or ``inference_mode``. A model that cannot be copied is used itself, with a
    warning: then it is placed by :func:`dissect.prepare_model` (moved only when ``device``
    asks) and put in eval mode, and every module's mode is restored on exit. Running out of
    memory while copying is an error, never a reason to fall back to the caller's model.
    """
    module = model.module if isinstance(model, PreparedModel) else model
    dev = run_device(module, device)
    spread = len(model_devices(module)) > 1
    runner = fast_copy(module, None if spread else dev, layers)
    if runner is module:
        with prepared(model, device) as run:
            yield module, run.device
        return
    with torch.inference_mode(False), torch.enable_grad():
        yield runner, dev


def _normalizer(normalize: Normalizer | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from images in [0, 1] to model inputs (identity when none is given)."""
    if normalize is None:
        return lambda x: x
    method = getattr(normalize, "normalize", None)  # a dissect.models.Preprocess
    if callable(method):
        return method
    if not callable(normalize):
        raise DissectError(
            f"normalize must be a dissect.models.Preprocess or a callable on (N, 3, H, W) "
            f"images in [0, 1], got {type(normalize).__name__}"
        )
    return normalize


def _check_common(steps: Any, lr: Any, batch_size: Any, seed: Any, param: Any) -> None:
    positive_int(steps, "steps", minimum=0)
    optional_positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise DissectError(f"lr must be a positive number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DissectError(f"seed must be an integer, got {seed!r}")
    if param not in PARAMS:
        raise DissectError(f"unknown param {param!r}: use one of {', '.join(PARAMS)}")


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations as float32 for the objectives (a differentiable cast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _Forward:
    """One forward pass returning ``{layer: activation}`` with the graph kept.

    Stops right after the deepest needed layer unless the model output is needed. The images
    stay float32 (so does their optimization); the normalized input is cast to the model's
    floating dtype, and half-precision activations are read back as float32. Token layers
    are read as ``(N, C, h, w)`` maps of their patch grid (``tokens``, as in
    :class:`~dissect.hooks.Trace`), so objectives address hidden dimensions and patch
    positions, never token indices.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], output: bool,
                 normalize: Callable[[torch.Tensor], torch.Tensor], tokens: TokensSpec = "auto",
                 select: Selector | dict[str, Selector] | None = None) -> None:
        self.model, self.output, self.normalize = model, output, normalize
        self.dtype = floating_dtype(model)
        # a differentiable copy: later in-place ops (ReLU(inplace=True)) cannot change it
        self.trace = (Trace(model, list(layers), stop=not output,
                            record=lambda name, t: _as_float(t.clone()), tokens=tokens,
                            select=select) if layers else None)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize(images)
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.trace is None:
            return {OUTPUT: _as_float(first_tensor(self.model(x), "the model output"))}
        with self.trace as tr:
            out = self.model(x)  # with stop=True, StopForward ends the pass here (swallowed)
        acts = dict(tr.outputs)
        missing = [name for name in tr.layers if name not in acts]
        if missing:
            raise DissectError(
                f"layers {missing} did not run during the forward pass, so they have no "
                "activations to optimize: choose layers the model calls in forward()"
            )
        if self.output:
            acts[OUTPUT] = _as_float(first_tensor(out, "the model output"))
        return acts


def _needed(model: nn.Module, objectives: Sequence[Objective]) -> tuple[list[str], bool]:
    layers = list(dict.fromkeys(n for o in objectives for n in o.layers if n != OUTPUT))
    if layers:
        layers = resolve_layers(as_module(model), layers)  # closest names on a typo
    return layers, any(o.needs_output for o in objectives)


def _transformed_forward(forward: _Forward, x: torch.Tensor, images: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
    """``forward(x)`` on the transformed ``images``. A model that fails on transformed images
    of another size but runs on the images themselves takes one input size only (a Vision
    Transformer): it is told how to keep the size. Any other failure is raised as it is."""
    try:
        return forward(x)
    except (DissectError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        if tuple(x.shape[-2:]) == tuple(images.shape[-2:]) or not _runs(forward, images):
            raise
        h, w = images.shape[-2:]
        raise DissectError(
            f"the model failed on the {tuple(x.shape[-2:])} images that the random transforms "
            f"made of the {h}x{w} images, on which it runs ({type(exc).__name__}: {exc}). A "
            "model that takes one input size only (a Vision Transformer) needs transforms that "
            "keep it: transforms=standard_transforms(size=S) (Lucid's, resized back to S) or "
            "transforms=None, with size=S its input size") from exc


def _runs(forward: _Forward, images: torch.Tensor) -> bool:
    """Whether the model runs on ``images`` (without gradients)."""
    try:
        with torch.no_grad():
            forward(images.detach())
    except Exception:  # noqa: BLE001 - only whether it runs is asked
        return False
    return True


def _rowwise(objectives: Sequence[Objective], acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Objective ``k`` on row ``k`` of the activations: ``(len(objectives),)`` values."""
    if len(objectives) == 1:
        return objectives[0](acts).reshape(1)
    # one split per layer: its backward is a single concatenation, where per-row slices
    # would each allocate a full-size zero gradient (quadratic in the number of objectives)
    rows = {name: t.split(1) for name, t in acts.items()}
    values = [obj({name: parts[k] for name, parts in rows.items()}).reshape(1)
              for k, obj in enumerate(objectives)]
    return torch.cat(values)


# --------------------------------------------------------------------------- visualize


@overload
def visualize(model: nn.Module | PreparedModel,
              objectives: ObjectiveLike | Sequence[ObjectiveLike], *,
              return_result: Literal[False] = False, **options: Any) -> torch.Tensor: ...


@overload
def visualize(model: nn.Module | PreparedModel,
              objectives: ObjectiveLike | Sequence[ObjectiveLike], *,
              return_result: Literal[True], **options: Any) -> ActmaxResult: ...


@renamed_kwargs(batch="batch_size", transform="normalize")
def visualize(
    model: nn.Module | PreparedModel,
    objectives: ObjectiveLike | Sequence[ObjectiveLike],
    *,
    size: int = 128,
    steps: int = 512,
    lr: float = 0.05,
    param: str = "fft",
    decorrelate: bool = True,
    transforms: str | Sequence[TransformLike] | None = "standard",
    regularizers: RegularizerLike | Sequence[RegularizerLike] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    normalize: Normalizer | None = None,
    return_result: bool = False,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> torch.Tensor | ActmaxResult:
    """Images that maximize each objective (activation maximization, Erhan 2009; Olah 2017).

    Every objective gets its own image; all images share one batched forward (and backward)
    pass per step, so 64 units cost one forward of 64 images, not 64 forwards. The pass stops
    after the deepest layer any objective reads (unless a :func:`logit` needs the output), and
    gradients are taken with respect to the images only (no weight gradients are computed).

    Parameters
    ----------
    model
        The network. It is left untouched: the optimization runs on an eval-mode copy on
        ``device`` (see Notes).
    objectives
        One objective or a list: ``("layer", unit)`` tuples (channel mean) or objectives from
        :mod:`dissect.actmax.objectives` (:func:`channel`, :func:`neuron`, :func:`logit`,
        :func:`direction` and sums / multiples of them).
    size
        Side of the square images in pixels.
    steps
        Adam steps (0 returns the initial images).
    lr
        Adam learning rate (Lucid's 0.05).
    param
        ``"fft"`` (1/f-scaled spectrum, default) or ``"pixel"``; see :mod:`.param`.
    decorrelate
        Optimize in the decorrelated ImageNet colour basis.
    transforms
        ``"standard"`` (Lucid's pad 12, jitter 8, scale 0.9-1.1, rotate +-10 degrees,
        jitter 4), ``None`` for none, or a list of :class:`~dissect.actmax.transforms.Transform`
        objects and callables ``images -> images``. Applied to the images in [0, 1], before
        ``normalize``. ``"standard"`` changes the images' size; for a model that takes one
        input size (a Vision Transformer) pass ``transforms=standard_transforms(size=size)``,
        which resizes them back.
    regularizers
        Penalties subtracted from the objective: :class:`~.regularizers.L1`,
        :class:`~.regularizers.L2`, :class:`~.regularizers.TotalVariation`,
        :class:`~.regularizers.Blur` (each with a weight) or callables ``images -> (N,)``.
    batch_size
        At most this many images per forward pass (a memory bound); ``None``: all at once.
        It does not change the result. (``batch=`` is a deprecated alias, for one release.)
    seed
        Seed of the ``torch.Generator`` for the initial noise and the transforms. Every image
        starts from the same noise and sees the same random transforms, so image ``k`` depends
        only on its objective and the seed: it is the same alone or in any batch (up to the
        float rounding of batched convolutions).
    device
        Where to compute; ``None``: the model's accelerator if it is on one, else CUDA when
        available, else the CPU.
    progress
        Show a tqdm progress bar over the steps.
    normalize
        The model's own input normalization, mapping images in [0, 1] to model inputs: a
        :class:`dissect.models.Preprocess` (its ``normalize`` is used; never its resize) or a
        callable on ``(N, 3, H, W)`` batches. ``None``: the model takes [0, 1] images. For
        ``model, pre = load_model(...)`` pass ``normalize=pre``. (``transform=`` is a
        deprecated alias, for one release: in torch-dissect ``transform`` names a dataset's
        per-image preprocessing only.)

    return_result
        Return an :class:`~dissect.actmax.ActmaxResult` (the images, each objective's name and
        unit, the value each image reaches without the random transforms, the settings; one
        more forward pass) instead of the bare images.
    tokens
        How a transformer layer's ``(N, T, C)`` tokens are read (:mod:`dissect.hooks.tokens`):
        ``"auto"`` (recognized models: torchvision's and timm's ViTs, Swin; another 3-D
        output is an error saying how to pass a layout), a :class:`~dissect.hooks.TokenGrid`,
        ``None`` (outputs as they are) or ``{layer: TokenGrid | None}``. A token layer's
        activations are ``(N, C, h, w)`` maps of its patch grid: ``("layer", c)`` is hidden
        dimension ``c`` averaged over the patch tokens, :func:`neuron` addresses a patch
        position (prefix tokens such as the class token are not part of the map).
    select
        Which tensor of a module returning several is the layer's output (an index, a key or
        a callable; :mod:`dissect.hooks.select`), for every layer or as ``{layer: selector}``.

    Returns
    -------
    torch.Tensor or ActmaxResult
        ``(len(objectives), 3, size, size)`` float32 images in [0, 1], on the CPU (or the
        result holding them, with ``return_result=True``).

    Raises
    ------
    LayerNotFoundError
        For a layer name that is not in the model.
    DissectError
        For a bad parametrization, augmentation, unit out of range for its layer, and so on.

    Notes
    -----
    The passes run on a copy of the model in eval mode whose parameters do not require grad,
    with each eval-mode ``BatchNorm2d`` that follows a ``Conv2d`` in an ``nn.Sequential``
    folded into the convolution (not where the convolution's own output is read) and, on the
    CPU, channels-last memory layout; this is equal up to float rounding and about twice as
    fast on MobileNetV2 (:mod:`dissect.actmax.fastcopy`). A model that cannot be deep-copied is
    used itself (eval mode during the call, modes restored afterwards).

    Examples
    --------
    >>> model, pre = load_model("mobilenet_v2-imagenet")                  # doctest: +SKIP
    >>> images = visualize(model, [("features.10", u) for u in range(16)],
    ...                    normalize=pre, steps=256)                      # doctest: +SKIP
    >>> save_grid(images, "features10.png", ncol=8)                       # doctest: +SKIP
    """
    objs = as_objectives(objectives)
    _check_common(steps, lr, batch_size, seed, param)
    size = positive_int(size, "size")
    tfs = resolve_transforms(transforms)
    regs = resolve_regularizers(regularizers)
    norm = _normalizer(normalize)
    layers, needs_output = _needed(model, objs)
    n = len(objs)
    with _prepared(model, device, layers) as (runner, dev):
        log.info("actmax: %d objective(s) on %s, %d steps, %d px, param=%s, %s", n, dev,
                 steps, size, param, "full forward (logits)" if needs_output else
                 f"forward stops after the deepest of {layers}")
        gen = torch.Generator().manual_seed(int(seed))
        image = ImageParam(n, (size, size), param=param, decorrelate=decorrelate,
                           generator=gen, device=dev)
        optimizer = torch.optim.Adam([image.leaf], lr=lr)
        forward = _Forward(runner, layers, needs_output, norm, tokens, select)
        chunks = row_chunks(n, batch_size)
        bar = progress_bar(steps, "actmax", progress, unit="step", iterable=range(steps))
        for step in bar:
            values = draw(tfs, gen)  # one draw per step, shared by every image and chunk
            optimizer.zero_grad(set_to_none=True)
            scores = []
            for a, b in chunks:
                images = image(a, b)
                acts = _transformed_forward(forward, apply_all(tfs, values, images), images)
                score = _rowwise(objs[a:b], acts)
                loss = -score.sum()
                for reg in regs:
                    loss = loss + reg(images).sum()
                loss.backward(inputs=[image.leaf])
                scores.append(score.detach())
            optimizer.step()
            if bar.disable is False and (step % POSTFIX_EVERY == 0 or step == steps - 1):
                bar.set_postfix(objective=f"{float(torch.cat(scores).mean()):.4g}")
        bar.close()
        with torch.no_grad():
            final = image()
            if not return_result:
                return final.float().cpu()
            reached = torch.cat([_rowwise(objs[a:b], forward(final[a:b])) for a, b in chunks])
    settings = {"size": size, "steps": steps, "lr": lr, "param": param,
                "decorrelate": decorrelate, "transforms": _describe(transforms),
                "seed": seed, "device": str(dev), "batch_size": batch_size}
    return ActmaxResult("visualize", final.float().cpu(), [o.name for o in objs],
                        [o.unit for o in objs], reached.double().cpu().numpy(), settings)


def _describe(transforms: Any) -> Any:
    """The ``transforms=`` argument as JSON-friendly text."""
    if transforms is None or isinstance(transforms, str):
        return transforms
    return [getattr(t, "__name__", type(t).__name__) for t in transforms]


# --------------------------------------------------------------------------- evaluate


@renamed_kwargs(batch="batch_size", transform="normalize")
def evaluate(
    model: nn.Module | PreparedModel,
    objectives: ObjectiveLike | Sequence[ObjectiveLike],
    images: torch.Tensor,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    normalize: Normalizer | None = None,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> torch.Tensor:
    """Objective ``k`` on image ``k``, without transforms (how far each image got).

    Parameters
    ----------
    model
        The network (left untouched, as in :func:`visualize`).
    objectives
        One objective (applied to every image) or one per image.
    images
        ``(N, 3, H, W)`` in [0, 1].
    batch_size
        At most this many images per forward pass.
    device, normalize, tokens, select
        As in :func:`visualize`.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 values on the CPU.
    """
    objs = as_objectives(objectives)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise DissectError("images must be a (N, 3, H, W) tensor in [0, 1]")
    n = images.shape[0]
    if len(objs) == 1:
        objs = objs * n
    if len(objs) != n:
        raise DissectError(f"{len(objs)} objectives for {n} images: give one, or one per image")
    optional_positive_int(batch_size, "batch_size")
    norm = _normalizer(normalize)
    layers, needs_output = _needed(model, objs)
    out = []
    with _prepared(model, device, layers) as (runner, dev), torch.no_grad():
        forward = _Forward(runner, layers, needs_output, norm, tokens, select)
        for a, b in row_chunks(n, batch_size):
            acts = forward(images[a:b].to(dev, torch.float32))
            out.append(_rowwise(objs[a:b], acts).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- invert


def representation_distance(target: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``||other - target||^2 / ||target||^2`` per row: Mahendran & Vedaldi's relative loss."""
    diff = (other - target).flatten(1).pow(2).sum(1)
    return diff / target.flatten(1).pow(2).sum(1).clamp_min(1e-12)


@overload
def invert(model: nn.Module | PreparedModel, x: torch.Tensor, layer: str, *,
           return_result: Literal[False] = False, **options: Any) -> torch.Tensor: ...


@overload
def invert(model: nn.Module | PreparedModel, x: torch.Tensor, layer: str, *,
           return_result: Literal[True], **options: Any) -> ActmaxResult: ...


@renamed_kwargs(batch="batch_size", transform="normalize")
def invert(
    model: nn.Module | PreparedModel,
    x: torch.Tensor,
    layer: str,
    *,
    steps: int = 200,
    lr: float = 0.05,
    tv_weight: float = 0.5,
    tv_beta: float = 2.0,
    param: str = "fft",
    decorrelate: bool = True,
    regularizers: RegularizerLike | Sequence[RegularizerLike] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    normalize: Normalizer | None = None,
    return_result: bool = False,
    tokens: TokensSpec = "auto",
    select: Selector | dict[str, Selector] | None = None,
) -> torch.Tensor | ActmaxResult:
    """Reconstruct images from a layer's representation (Mahendran & Vedaldi, CVPR 2015).

    Starting from noise, minimizes for each image
    ``||phi(r) - phi(x)||^2 / ||phi(x)||^2 + tv_weight * TV^beta(r)`` (plus ``regularizers``),
    where ``phi`` is ``layer``'s activation of the normalized image. What survives in the
    reconstruction is what the layer keeps of the input.

    Parameters
    ----------
    model
        The network (left untouched, as in :func:`visualize`).
    x
        Images in [0, 1]: ``(B, 3, H, W)`` or one ``(3, H, W)``. Not normalized: the model's
        normalization comes from ``normalize``.
    layer
        The layer whose representation is inverted. A token layer's representation is the
        ``(C, h, w)`` map of its patch tokens (``tokens=``); its prefix tokens (the class
        token) are not part of the target.
    steps, lr
        Adam steps and learning rate.
    tv_weight, tv_beta
        Weight and exponent of the total-variation prior (see
        :func:`~dissect.actmax.regularizers.total_variation`); ``tv_weight=0`` disables it.
        The default is mild so that targets that are not natural images (noise, toy models)
        can still be matched; for photographs through ImageNet models, weights of 5-20 give
        visibly smoother reconstructions at almost the same representation distance.
    param, decorrelate
        Parametrization of the reconstruction, as in :func:`visualize`.
    regularizers
        Further penalties, as in :func:`visualize`.
    batch_size, seed, device, progress, normalize, tokens, select
        As in :func:`visualize`.
    return_result
        Return an :class:`~dissect.actmax.ActmaxResult` (kind ``"invert"``, values: each
        reconstruction's final representation distance) instead of the bare images.

    Returns
    -------
    torch.Tensor or ActmaxResult
        Reconstructions in [0, 1], shaped like ``x``, float32 on the CPU (with
        ``return_result=True``, the result holds them as ``(B, 3, H, W)``).
    """
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise DissectError(
            f"x must be images in [0, 1] shaped (B, 3, H, W) or (3, H, W), got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )
    single = x.ndim == 3
    xs = (x[None] if single else x).detach().float()
    if xs.shape[0] == 0:
        raise DissectError("x is an empty batch")
    if float(xs.min()) < -0.01 or float(xs.max()) > 1.01:
        log.warning("invert: x spans [%.2f, %.2f]; it should be images in [0, 1] (pass the "
                    "model's normalization as normalize=)", float(xs.min()), float(xs.max()))
    _check_common(steps, lr, batch_size, seed, param)
    if isinstance(tv_weight, bool) or not isinstance(tv_weight, numbers.Real) or tv_weight < 0:
        raise DissectError(f"tv_weight must be a number >= 0, got {tv_weight!r}")
    regs = resolve_regularizers(regularizers)
    if tv_weight > 0:
        regs = [TotalVariation(float(tv_weight), float(tv_beta)), *regs]
    norm = _normalizer(normalize)
    (name,) = resolve_layers(as_module(model), layer if isinstance(layer, str) else [layer])
    n, (h, w) = xs.shape[0], xs.shape[-2:]
    with _prepared(model, device, [name]) as (runner, dev):
        forward = _Forward(runner, [name], False, norm, tokens, select)
        chunks = row_chunks(n, batch_size)
        with torch.no_grad():
            targets = [forward(xs[a:b].to(dev))[name].detach() for a, b in chunks]
        log.info("invert: %d image(s) from %s %s on %s, %d steps", n, name,
                 tuple(targets[0].shape[1:]), dev, steps)
        gen = torch.Generator().manual_seed(int(seed))
        image = ImageParam(n, (h, w), param=param, decorrelate=decorrelate, generator=gen,
                           device=dev)
        optimizer = torch.optim.Adam([image.leaf], lr=lr)
        bar = progress_bar(steps, "invert", progress, unit="step", iterable=range(steps))
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            dists = []
            for (a, b), target in zip(chunks, targets, strict=True):
                images = image(a, b)
                dist = representation_distance(target, forward(images)[name])
                loss = dist.sum()
                for reg in regs:
                    loss = loss + reg(images).sum()
                loss.backward(inputs=[image.leaf])
                dists.append(dist.detach())
            optimizer.step()
            if bar.disable is False and (step % POSTFIX_EVERY == 0 or step == steps - 1):
                bar.set_postfix(distance=f"{float(torch.cat(dists).mean()):.4g}")
        bar.close()
        with torch.no_grad():
            final = image()
            if return_result:
                reached = torch.cat([
                    representation_distance(target, forward(final[a:b])[name])
                    for (a, b), target in zip(chunks, targets, strict=True)])
    if not return_result:
        result = final.float().cpu()
        return result[0] if single else result
    settings = {"layer": name, "steps": steps, "lr": lr, "tv_weight": tv_weight,
                "tv_beta": tv_beta, "param": param, "decorrelate": decorrelate, "seed": seed,
                "device": str(dev), "batch_size": batch_size}
    return ActmaxResult("invert", final.float().cpu(), [f"invert {name}"] * n, [None] * n,
                        reached.double().cpu().numpy(), settings)
