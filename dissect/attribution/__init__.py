"""Attribution maps: which parts of an input made the model give this output.

One call shape for the family, ``method(model, x, target, ...) -> tensor shaped like x``
(Grad-CAM: ``(B, H, W)``); every method takes ``device=``, the batched ones ``batch_size=``
(a memory bound) and ``progress=``. ``target`` is a class index, a list of class indices (one
per input) or a callable mapping the model output to one score per row.

- :func:`saliency`, :func:`grad_x_input`: gradients (captum's ``Saliency``, ``InputXGradient``).
- :func:`smoothgrad`: saliency averaged over noisy copies; sigma relative to each input's range.
- :func:`integrated_gradients`: path integral from a baseline, captum's five rules, with the
  completeness delta.
- :func:`occlusion`: score drop under a sliding gray/baseline window.
- :func:`grad_cam`: a layer's maps weighted by their pooled gradients, upsampled; a
  transformer layer's patch tokens are read as maps (``tokens=``), and
  :func:`last_spatial_layer` picks the last layer the output depends on through its maps (for
  a class-token ViT the last block's first norm, not the last block).
- :func:`overlay`, :func:`heatmap`, :func:`save_png`: OpenCV colormaps and PNG files.
"""

from ._core import Target
from .gradcam import grad_cam, last_spatial_layer
from .gradient import grad_x_input, integrated_gradients, quadrature, saliency, smoothgrad
from .occlusion import occlusion
from .render import colormap_code, heatmap, image_array, normalize_map, overlay, save_png

METHODS = {
    "saliency": saliency,
    "grad_x_input": grad_x_input,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
    "grad_cam": grad_cam,
}

__all__ = [
    "METHODS",
    "Target",
    "colormap_code",
    "grad_cam",
    "grad_x_input",
    "heatmap",
    "image_array",
    "integrated_gradients",
    "last_spatial_layer",
    "normalize_map",
    "occlusion",
    "overlay",
    "quadrature",
    "saliency",
    "save_png",
    "smoothgrad",
]
