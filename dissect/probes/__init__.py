"""Per-layer linear classifier probes (Alain & Bengio 2016), controls after Hewitt & Liang 2019.

How linearly decodable is a label at each layer? :func:`probe` fits a multinomial logistic
regression on every layer's pooled (or, for a transformer layer, class-token:
``pool="cls"``), standardized activations from an
:class:`~dissect.store.ActivationStore`, all layers in one batched L-BFGS run on the device, and
reports train and held-out test accuracy next to a *control*: the same probe trained on labels
permuted across samples. In high dimensions a linear probe fits noise (with as many features as
samples, training accuracy reaches 100% on random labels); the control measures that capacity, and
layers whose training accuracy it explains are flagged.

Modules: :mod:`~dissect.probes._data` (labels, split, features: pooling, standardization,
reduction, memory budget), :mod:`~dissect.probes._fit` (batched L-BFGS),
:mod:`~dissect.probes.result` (:class:`ProbeResult`: summary, CSV, JSON, plot).
"""

from ._data import dataset_targets, stratified_split
from ._probe import REG_GRID, ProbeOptions, probe
from .result import LayerProbe, ProbeResult

__all__ = [
    "REG_GRID",
    "LayerProbe",
    "ProbeOptions",
    "ProbeResult",
    "dataset_targets",
    "probe",
    "stratified_split",
]
