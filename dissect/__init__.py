"""torch-dissect: open trained PyTorch networks layer by layer.

Public API (re-exported names only; each lives in a module named for what it does)::

    from dissect import Trace, capture, layer_names, ActivationStore, load_model, DissectError
"""

from .errors import DataError, DissectError, LayerNotFoundError, ModelSpecError, StoreError
from .hooks import Trace, capture, layer_names
from .store import ActivationStore

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "DataError",
    "DissectError",
    "LayerNotFoundError",
    "ModelSpecError",
    "StoreError",
    "Trace",
    "capture",
    "layer_names",
    "load_model",
    "__version__",
]


def __getattr__(name: str):  # load_model imports torchvision; keep `import dissect` light
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'dissect' has no attribute {name!r}")
