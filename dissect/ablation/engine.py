"""The ablation passes: every copy of a batch with its own units removed, and what the model
says then, class by class.

:class:`Ablator` runs one batch at a time. A batch is repeated ``k`` times in one forward pass
(copy 0 of the first pass is the unablated baseline), an edit at the layer removes copy ``i``'s
units, and only the part of the network after the layer is computed per copy when the plan of
:mod:`~dissect.ablation.prefix` holds (else the whole forward runs, which is exact too).
:class:`ClassTally` sums the metric per class.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataError, DissectError
from ..hooks.select import first_tensor
from ..hooks.trace import Trace
from .prefix import Plan, _Shape, _tensors, plan_prefix, repeat_batch, run_prefix, stubbed

log = logging.getLogger(__name__)

#: memory for one pass of copies when the device does not say (bytes); CUDA: half its free memory
CPU_BUDGET = 1 << 30
#: most copies of a batch in one pass
MAX_COPIES = 64


def _nothing(name: str, tensor: torch.Tensor) -> None:
    return None


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    if got.shape != ref.shape:
        return False
    loose = ref.dtype in (torch.float16, torch.bfloat16)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    rtol = 1e-2 if loose else 1e-4
    return bool(torch.allclose(got, ref, rtol=rtol, atol=rtol * 0.1 * (1.0 + scale)))


def logits_of(out: Any, rows: int) -> torch.Tensor:
    """The ``(rows, n_outputs)`` logits of a model's output (its first tensor)."""
    logits = first_tensor(out, "the model's output")
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise DissectError(f"the model returned {tuple(logits.shape)} for {rows} inputs; "
                           "ablate needs (batch, classes) logits")
    return logits


def _edit_copies(name: str, m: torch.Tensor, *, copies: list[torch.Tensor | None],
                 fill: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Remove copy ``i``'s units (``copies[i]``; ``None``: none) in rows ``i * batch ...``."""
    if m.ndim < 2 or m.shape[0] != len(copies) * batch:
        raise DissectError(f"layer {name!r} returns {tuple(m.shape)} for {len(copies) * batch} "
                           "inputs: ablate needs a (batch, units, ...) output")
    if all(idx is None for idx in copies):
        return None
    m = m.clone()  # never write into the module's own output (nn.Identity returns its input)
    view = m.unflatten(0, (len(copies), batch))
    for i, idx in enumerate(copies):
        if idx is None or idx.numel() == 0:
            continue
        if fill is None:
            view[i, :, idx] = 0
        else:
            view[i, :, idx] = fill[idx].view(-1, *([1] * (m.ndim - 2))).to(m.dtype)
    return m


class Ablator:
    """Forward passes of copies of a batch, each with its own units of ``layer`` removed.

    Parameters
    ----------
    model
        The model (in eval mode; call under ``torch.inference_mode``).
    layer
        The layer.
    tokens, select
        As for :class:`~dissect.hooks.Trace`.
    """

    def __init__(self, model: nn.Module, layer: str, tokens: Any, select: Any) -> None:
        self.model, self.layer, self.tokens, self.select = model, layer, tokens, select
        self.plan: Plan | None = None
        self.reason: str | None = None  # why the prefix is not cached
        self.shape: tuple[int, ...] = ()  # the layer's map for the first batch
        self.n_outputs = 0
        self.kept_bytes = 0
        self._reference: torch.Tensor | None = None  # the first batch's logits, to check with
        self._warned = False

    # ------------------------------------------------------------------ the first batch

    def start(self, x: torch.Tensor) -> list[Any] | None:
        """Plan on the first batch; the batch's prefix (or ``None``). The plan is checked by
        the first :meth:`forward`, whose first copy must be unablated."""
        b = len(x)
        with Trace(self.model, [self.layer], record=lambda n, t: tuple(t.shape),
                   tokens=self.tokens, select=self.select) as tr:
            plan, kept, out = plan_prefix(self.model, self.layer, x)
        self._reference = logits_of(out, b)
        self.n_outputs = self._reference.shape[1]
        self.shape = tr.outputs[self.layer]
        if len(self.shape) < 2 or self.shape[0] != b:
            raise DissectError(f"layer {self.layer!r} gives {self.shape} for {b} inputs: ablate "
                               "needs a (batch, units, ...) output")
        if not isinstance(plan, Plan) or kept is None:
            self.reason = str(plan)
            return None
        self.plan = plan
        self.kept_bytes = sum(t.numel() * t.element_size() for value, read in
                              zip(kept, plan.read, strict=True) if read for t in _tensors(value))
        return kept

    def _check(self, logits: torch.Tensor | None, error: Exception | None) -> bool:
        """Whether the first stubbed pass reproduced the model (else: full passes from now)."""
        ref, self._reference = self._reference, None
        if error is not None:
            self.reason = f"the forward with the prefix cached failed ({error!r:.200})"
        elif logits is None or not _close(logits[: len(ref)], ref):
            diff = (float((logits[: len(ref)] - ref).abs().max())
                    if logits is not None and logits.shape[1:] == ref.shape[1:] else math.nan)
            self.reason = ("the forward with the prefix cached differs from the model's "
                           f"output (max |difference| {diff:.3g})")
        else:
            return True
        log.warning("ablate %r: %s; running full forward passes instead (exact, slower)",
                    self.layer, self.reason)
        self.plan = None
        return False

    def copies_per_pass(self, x: torch.Tensor, total: int) -> int:
        """How many copies of a batch like ``x`` to run in one pass (a memory estimate)."""
        layer_bytes = int(np.prod(self.shape)) * x.element_size()
        if self.plan is not None:
            per_copy = x.numel() * x.element_size() + self.kept_bytes + 4 * layer_bytes
        else:
            per_copy = x.numel() * x.element_size() + 16 * layer_bytes
        budget = CPU_BUDGET
        if x.device.type == "cuda":
            budget = torch.cuda.mem_get_info(x.device)[0] // 2
        return int(max(1, min(MAX_COPIES, total, budget // max(1, per_copy))))

    # ------------------------------------------------------------------ every batch

    def prefix(self, x: torch.Tensor) -> list[Any] | None:
        """The batch's prefix outputs, or ``None``: run full forward passes for it."""
        if self.plan is None:
            return None
        kept = run_prefix(self.model, self.plan, x)
        if kept is None and not self._warned:
            self._warned = True
            log.warning("layer %r: a batch ran other module calls before the layer than the "
                        "first batch; such batches run full forward passes (exact, slower)",
                        self.layer)
        return kept

    def forward(self, x: torch.Tensor, kept: list[Any] | None,
                copies: list[torch.Tensor | None], fill: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(len(copies) * B, n_outputs)``: copy ``i`` with ``copies[i]`` removed."""
        rows = len(copies) * len(x)
        edit = partial(_edit_copies, copies=copies, fill=fill, batch=len(x))
        if kept is not None and self.plan is not None:
            if self._reference is None:
                with Trace(self.model, [self.layer], record=_nothing, tokens=self.tokens,
                           select=self.select, edit=edit):
                    return logits_of(self._stubbed_forward(self.plan, kept, x, copies), rows)
            if copies[0] is not None:
                raise DissectError("internal: the first pass must start with the baseline")
            logits, error = None, None
            try:
                with Trace(self.model, [self.layer], record=_nothing, tokens=self.tokens,
                           select=self.select, edit=edit):
                    logits = logits_of(self._stubbed_forward(self.plan, kept, x, copies), rows)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: do not cut here
                error = exc
            if self._check(logits, error):
                return logits
        with Trace(self.model, [self.layer], record=_nothing, tokens=self.tokens,
                   select=self.select, edit=edit):
            out = self.model(x.repeat(len(copies), *([1] * (x.ndim - 1))))
        return logits_of(out, rows)

    def _stubbed_forward(self, plan: Plan, kept: list[Any], x: torch.Tensor,
                         copies: list) -> Any:
        k, b = len(copies), len(x)
        given = x if plan.input_read else _Shape(tuple(x.shape), x.dtype, x.device)
        with stubbed(self.model, plan, kept, k, b):
            return self.model(repeat_batch(given, k, b))


class ClassTally:
    """Sums of a metric per model output, for each copy (row 0: the baseline).

    Parameters
    ----------
    rows
        Copies tallied (baseline included).
    n_outputs
        The model's outputs.
    metric
        ``"accuracy"``, ``"logit"`` or ``"probability"``.
    """

    def __init__(self, rows: int, n_outputs: int, metric: str) -> None:
        self.sums = torch.zeros(rows, n_outputs, dtype=torch.float64)
        self.counts = torch.zeros(n_outputs, dtype=torch.int64)
        self.metric = metric

    def count(self, targets: torch.Tensor) -> None:
        """Count one batch's samples per class."""
        t = targets.cpu()
        self.counts.index_add_(0, t, torch.ones_like(t))

    def add(self, start: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the metric of copies ``start ...`` (``logits``: ``(k * B, n_outputs)``)."""
        b = len(targets)
        v = logits.unflatten(0, (-1, b))
        k = v.shape[0]
        if self.metric == "accuracy":
            vals = (v.argmax(dim=2) == targets).to(torch.float32)
        else:
            if self.metric == "probability":
                v = torch.softmax(v.float() if v.dtype in (torch.float16, torch.bfloat16)
                                  else v, dim=2)
            vals = v.gather(2, targets.view(1, b, 1).expand(k, b, 1)).squeeze(2)
        self.sums[start:start + k].index_add_(1, targets.cpu(), vals.cpu().to(torch.float64))

    def means(self, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, means)`` of ``classes``: int64 ``(n,)`` and float64 ``(rows, n)``; NaN
        for a class without samples."""
        counts = self.counts.numpy()[classes]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.sums.numpy()[:, classes] / counts[None, :]
        means[:, counts == 0] = np.nan
        return counts, means


def check_targets(targets: Any, n: int) -> np.ndarray | None:
    """``targets`` as int64 ``(n,)`` (``None`` stays ``None``); a :class:`DataError` for
    anything else."""
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        arr = targets.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(targets)
        except (TypeError, ValueError) as exc:
            raise DataError(f"targets must be one class index per sample: {exc}") from exc
    if arr.ndim != 1:
        raise DataError(f"targets must be one class index per sample, shape ({n},); got shape "
                        f"{arr.shape}")
    if len(arr) != n:
        raise DataError(f"targets has {len(arr)} labels for {n} samples: give one label per "
                        "sample, in the data's order")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"targets must be integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)
