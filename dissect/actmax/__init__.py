"""Activation maximization and feature inversion: what does a unit want to see?

- :func:`visualize`: one optimized image per objective (Erhan et al. 2009; Olah et al.,
  *Feature Visualization*, Distill 2017), all objectives sharing one batched forward per step,
  stopped after the deepest layer needed. Parametrizations ``"fft"`` (1/f-scaled spectrum) and
  ``"pixel"``, ImageNet colour decorrelation, Lucid's ``"standard"`` random transforms in pure
  torch, optional regularizers; deterministic for a seed.
- :func:`invert`: reconstruct images from a layer's representation with a total-variation
  prior (Mahendran & Vedaldi, CVPR 2015).
- :func:`evaluate`: the objective reached by given images, without transforms.
- Objectives (:mod:`.objectives`): ``("layer", unit)``, :func:`channel`, :func:`neuron`,
  :func:`logit`, :func:`direction`; they add, subtract, negate and scale. A Vision
  Transformer's token layers are read as ``(N, C, h, w)`` maps of their patch grid
  (``tokens=``, :class:`dissect.hooks.TokenGrid`): a unit is a hidden dimension, averaged over
  the patch tokens, and :func:`neuron` addresses a patch position.
- :class:`ActmaxResult` (``visualize(..., return_result=True)``): the images with their
  objectives, units and the values reached; ``to_json``/``from_json`` for the report.
- :func:`save_grid`, :func:`save_unit_images`: PNG output (OpenCV).
"""

from . import objectives, regularizers, transforms
from .grid import make_grid, save_grid, save_unit_images, unit_image_path
from .objectives import OUTPUT, Objective, as_objective, channel, direction, logit, neuron
from .param import ImageParam
from .regularizers import L1, L2, Blur, TotalVariation, total_variation
from .render import evaluate, invert, representation_distance, visualize
from .result import ActmaxResult
from .transforms import (
    Jitter,
    Pad,
    RandomRotate,
    RandomScale,
    Resize,
    Transform,
    rotate,
    scale,
    standard_transforms,
)

__all__ = [
    "ActmaxResult",
    "L1",
    "L2",
    "OUTPUT",
    "Blur",
    "ImageParam",
    "Jitter",
    "Objective",
    "Pad",
    "RandomRotate",
    "RandomScale",
    "Resize",
    "TotalVariation",
    "Transform",
    "as_objective",
    "channel",
    "direction",
    "evaluate",
    "invert",
    "logit",
    "make_grid",
    "neuron",
    "objectives",
    "regularizers",
    "representation_distance",
    "rotate",
    "save_grid",
    "save_unit_images",
    "scale",
    "standard_transforms",
    "total_variation",
    "transforms",
    "unit_image_path",
    "visualize",
]
