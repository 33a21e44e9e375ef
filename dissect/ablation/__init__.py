"""Causal tests of units: remove units of a layer and measure what happens to each class.

Network Dissection says which concept a unit's activation matches; ablation says whether the
network *uses* the unit (Bau et al., PNAS 2020, "Understanding the role of individual units in
a deep neural network"). :func:`ablate` removes each unit of a layer in turn (set to 0 or to
its dataset mean), or keeps only a few (``keep=True``), and reports a metric per class
against the unablated model; :func:`ablate_concept` removes every detector of a concept found
by :func:`~dissect.netdissect.dissect` at once.

Modules: :mod:`~dissect.ablation.run` (the two functions), :mod:`~dissect.ablation.engine`
(copies of a batch with their units removed, per-class sums), :mod:`~dissect.ablation.prefix`
(running only the part of any model after a layer, exactly), :mod:`~dissect.ablation.result`
(:class:`AblationResult`).
"""

from .result import AblationResult
from .run import ablate, ablate_concept

__all__ = ["AblationResult", "ablate", "ablate_concept"]
