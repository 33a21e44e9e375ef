"""torch-dissect: open trained PyTorch networks layer by layer.

Public API (re-exported names only; each lives in a module named for what it does)::

    from dissect import Trace, capture, layer_names, ActivationStore, load_model, DissectError
    from dissect import prepare_model, PreparedModel       # the one device policy
    from dissect import dissect_units, reconstruct, visualize, probe, integrated_gradients

``import dissect`` stays light: the analyses (and torchvision, OpenCV, matplotlib) load on first
use of their names. Each also has its module: ``dissect.netdissect``, ``dissect.deconvnet``,
``dissect.actmax``, ``dissect.probes``, ``dissect.attribution``, ``dissect.similarity``,
``dissect.geometry``, ``dissect.ablation``, ``dissect.report``.
"""

from importlib import import_module

from ._plumbing.device import PreparedModel, prepare_model
from .errors import DataError, DissectError, LayerNotFoundError, ModelSpecError, StoreError
from .hooks import Trace, capture, layer_names
from .store import ActivationStore

__version__ = "0.2.0"

_LAZY = {  # public name -> (module, attribute)
    "load_model": ("models", "load_model"),
    "dissect_units": ("netdissect", "dissect"),
    "DissectionResult": ("netdissect", "DissectionResult"),
    "reconstruct": ("deconvnet", "reconstruct"),
    "top_patches": ("deconvnet", "top_patches"),
    "receptive_field": ("deconvnet", "receptive_field"),
    "visualize": ("actmax", "visualize"),
    "invert": ("actmax", "invert"),
    "probe": ("probes", "probe"),
    "ProbeResult": ("probes", "ProbeResult"),
    "saliency": ("attribution", "saliency"),
    "grad_x_input": ("attribution", "grad_x_input"),
    "smoothgrad": ("attribution", "smoothgrad"),
    "integrated_gradients": ("attribution", "integrated_gradients"),
    "occlusion": ("attribution", "occlusion"),
    "grad_cam": ("attribution", "grad_cam"),
    "write_report": ("report", "write_report"),
    "cka": ("similarity", "cka"),
    "cka_matrix": ("similarity", "cka_matrix"),
    "SimilarityResult": ("similarity", "SimilarityResult"),
    "embed": ("geometry", "embed"),
    "Embedding": ("geometry", "Embedding"),
    "intrinsic_dimension": ("geometry", "intrinsic_dimension"),
    "distance_concentration": ("geometry", "distance_concentration"),
    "intrinsic_dimension_curve": ("geometry", "intrinsic_dimension_curve"),
    "distance_concentration_curve": ("geometry", "distance_concentration_curve"),
    "LayerCurve": ("geometry", "LayerCurve"),
    "ablate": ("ablation", "ablate"),
    "ablate_concept": ("ablation", "ablate_concept"),
    "AblationResult": ("ablation", "AblationResult"),
}

__all__ = [
    "ActivationStore",
    "DataError",
    "DissectError",
    "LayerNotFoundError",
    "ModelSpecError",
    "PreparedModel",
    "StoreError",
    "Trace",
    "capture",
    "layer_names",
    "prepare_model",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    """Load an analysis's public name on first use (PEP 562)."""
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'dissect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
