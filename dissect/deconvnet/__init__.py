"""What input pattern drove this unit? Deconvnet projections and Zeiler & Fergus's top patches.

- :func:`reconstruct`: project units of a hidden layer back to input space with the deconvnet
  (Zeiler & Fergus 2014), guided backprop (Springenberg et al. 2015) or the plain gradient.
- :func:`receptive_field`: the exact input box each position of a layer looks at.
- :func:`top_patches`: each unit's top-k dataset images with their projections, cropped to the
  unit's receptive field at its maximum (the paper's Fig. 2), as a :class:`TopPatches` result.
- :func:`save_patch_grid`, :func:`save_unit_grids`: the
  classic grid image as PNG (OpenCV), and one PNG per unit, ``DIR/<layer>/unit_0012.png``;
  :func:`projection_image` turns one projection into a picture.

Vision Transformers: every function takes ``tokens=`` (and ``select=``) like
:class:`dissect.hooks.Trace`, so a block's ``(B, N, C)`` tokens are read as ``(B, C, h, w)``
maps of its patch grid: a unit is a hidden dimension, a position a patch. The deconvnet and
guided-backprop rules are defined for ReLU networks; a network with no rectifier before the
layer (a GELU ViT) is refused under them (use ``method="gradient"``). From the first attention
on, a token's receptive field is the whole image, and so is its top "patch".
"""

from ._common import METHODS
from ._rules import RectifierRules
from .patches import top_patches
from .projection import reconstruct
from .receptive import ReceptiveField, receptive_field
from .render import (
    patch_grid,
    projection_image,
    save_patch_grid,
    save_unit_grids,
)
from .result import Patch, TopPatches

__all__ = [
    "METHODS",
    "Patch",
    "ReceptiveField",
    "RectifierRules",
    "TopPatches",
    "patch_grid",
    "projection_image",
    "receptive_field",
    "reconstruct",
    "save_patch_grid",
    "save_unit_grids",
    "top_patches",
]
